"""Tests for training/pde.py: Burgers and Darcy solvers and data sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks.fno import pde


def cole_hopf_sine(x: np.ndarray, viscosity: float, t: float) -> np.ndarray:
    """Exact Burgers solution for u0 = sin(2 pi x) on [0, 1), float64.

    Cole-Hopf: u = -2 nu phi_x / phi, where phi_t = nu phi_xx and
    phi0 = exp(-(1 / 2 nu) int u0) = exp(cos(2 pi x) / (4 pi nu)). phi0 is analytic
    and periodic, so its Fourier series (computed on a fine grid) converges
    exponentially and the heat flow is exact mode by mode.
    """
    fine = 512
    grid = np.arange(fine) / fine
    phi_hat = np.fft.fft(np.exp(np.cos(2 * np.pi * grid) / (4 * np.pi * viscosity))) / fine
    k = np.fft.fftfreq(fine, d=1.0 / fine)
    phi_hat_t = phi_hat * np.exp(-viscosity * (2 * np.pi * k) ** 2 * t)
    waves = np.exp(2j * np.pi * np.outer(x, k))
    phi = np.real(waves @ phi_hat_t)
    phi_x = np.real(waves @ (2j * np.pi * k * phi_hat_t))
    return -2 * viscosity * phi_x / phi


@pytest.mark.parametrize("viscosity, resolution", [(0.1, 64), (0.02, 256)])
def test_burgers_matches_cole_hopf(viscosity, resolution):
    x = np.arange(resolution) / resolution
    u0 = jnp.asarray(np.sin(2 * np.pi * x), jnp.float32)
    t_final = 0.3  # past the steepening time 1/(2 pi) for nu = 0.02
    numeric = np.asarray(pde.solve_burgers(u0, viscosity, t_final, n_steps=300))
    exact = cole_hopf_sine(x, viscosity, t_final)
    assert np.max(np.abs(numeric - exact)) < 1e-4 * np.max(np.abs(exact))


def test_burgers_time_step_halving():
    u0 = pde.burgers_initial_conditions(jax.random.key(1), 2, 128)
    coarse = pde.solve_burgers(u0, 0.05, 0.2, n_steps=100)
    fine = pde.solve_burgers(u0, 0.05, 0.2, n_steps=200)
    change = float(jnp.linalg.norm(coarse - fine) / jnp.linalg.norm(fine))
    assert change < 1e-5


def test_burgers_conserves_mean_and_dissipates_energy():
    u0 = pde.burgers_initial_conditions(jax.random.key(2), 3, 128) + 0.3
    times = [0.0, 0.1, 0.2, 0.4]
    states = [u0] + [pde.solve_burgers(u0, 0.05, t, n_steps=int(t * 1000)) for t in times[1:]]
    mean0 = jnp.mean(u0, axis=-1)
    for u in states[1:]:
        np.testing.assert_allclose(jnp.mean(u, axis=-1), mean0, rtol=1e-6, atol=0)
    energy = np.array([jnp.sum(u * u, axis=-1) for u in states])  # (time, sample)
    assert np.all(np.diff(energy, axis=0) < 0)


def test_burgers_dataset_shapes_and_determinism():
    x, y = pde.burgers_dataset(4, 64, seed=3)
    assert x.shape == y.shape == (4, 64, 1)
    assert x.dtype == y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    x2, y2 = pde.burgers_dataset(4, 64, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, y3 = pde.burgers_dataset(4, 64, seed=4)
    assert not np.allclose(x, x3) and not np.allclose(y, y3)
    # Inputs are the fine-grid initial conditions subsampled, not re-drawn.
    assert float(jnp.max(jnp.abs(x))) > float(jnp.max(jnp.abs(y)))  # viscous decay


def test_same_seed_same_functions_at_every_resolution():
    # Zero-shot super-resolution needs the same input functions on finer grids.
    x64, y64 = pde.burgers_dataset(4, 64, seed=3)
    x128, y128 = pde.burgers_dataset(4, 128, seed=3)  # both solved on 256 points
    np.testing.assert_array_equal(x64, x128[:, ::2])
    np.testing.assert_array_equal(y64, y128[:, ::2])
    a16 = pde.darcy_permeability(jax.random.key(0), 3, 16)
    a31 = pde.darcy_permeability(jax.random.key(0), 3, 31)  # nodes of 16 are every 2nd
    assert float(jnp.mean(a16 == a31[:, ::2, ::2])) > 0.99


def test_start_gives_the_tail_of_the_same_draw():
    # A test split generated alone (at any grid) is the tail of the whole data set.
    a, u = pde.darcy_dataset(6, 9, seed=2)
    a_tail, u_tail = pde.darcy_dataset(6, 9, seed=2, start=4)
    assert a_tail.shape == u_tail.shape == (2, 9, 9, 1)
    np.testing.assert_array_equal(a_tail, a[4:])
    np.testing.assert_allclose(u_tail, u[4:], rtol=1e-5, atol=1e-7)
    x, y = pde.burgers_dataset(6, 32, seed=2)
    x_tail, y_tail = pde.burgers_dataset(6, 32, seed=2, start=4)  # same time step
    np.testing.assert_array_equal(x_tail, x[4:])
    np.testing.assert_allclose(y_tail, y[4:], rtol=1e-5, atol=1e-7)
    # The finer grid holds the same problems: same input at the shared points.
    a_fine, _ = pde.darcy_dataset(6, 17, seed=2, start=4)
    np.testing.assert_array_equal(a_fine[:, ::2, ::2], a_tail)
    x_fine, y_fine = pde.burgers_dataset(6, 64, seed=2, start=4)
    np.testing.assert_array_equal(x_fine[:, ::2], x_tail)
    np.testing.assert_array_equal(y_fine[:, ::2], y_tail)
    for bad in (-1, 6, 1.0, True):
        with pytest.raises(ValueError, match="start"):
            pde.darcy_dataset(6, 9, start=bad)
        with pytest.raises(ValueError, match="start"):
            pde.burgers_dataset(6, 32, start=bad)


def test_burgers_rejects_bad_arguments():
    with pytest.raises(ValueError, match="viscosity"):
        pde.solve_burgers(jnp.zeros(16), -1.0, 1.0, 10)
    with pytest.raises(ValueError, match="n_steps"):
        pde.solve_burgers(jnp.zeros(16), 0.1, 1.0, 0)
    with pytest.raises(ValueError, match="solver_resolution"):
        pde.burgers_dataset(2, 64, solver_resolution=96)


def test_darcy_operator_exact_on_quadratic():
    # The 5-point stencil is exact for polynomials of degree <= 3 per variable,
    # so for constant a and u = x(1-x)y(1-y): A u = 2 a (x(1-x) + y(1-y)).
    n = 9
    nodes = np.linspace(0, 1, n)
    xx, yy = np.meshgrid(nodes, nodes, indexing="ij")
    u = xx * (1 - xx) * yy * (1 - yy)
    a = np.full((n, n), 3.0)
    got = pde.darcy_operator(jnp.asarray(a), jnp.asarray(u))
    want = (2 * 3.0 * (xx * (1 - xx) + yy * (1 - yy)))[1:-1, 1:-1]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_darcy_solution_satisfies_discrete_equation():
    tol = 1e-5
    a, u = pde.darcy_dataset(3, 16, seed=0, tol=tol)
    assert a.shape == u.shape == (3, 16, 16, 1)
    assert a.dtype == u.dtype == jnp.float32
    assert set(np.unique(np.asarray(a))) == {3.0, 12.0}
    np.testing.assert_array_equal(u[:, 0], 0.0)
    np.testing.assert_array_equal(u[:, :, -1], 0.0)
    residual = pde.darcy_residual(a, u)
    assert residual.shape == (3, 14, 14)
    forcing_norm = np.sqrt(14 * 14)
    relative = jnp.linalg.norm(residual.reshape(3, -1), axis=1) / forcing_norm
    assert float(relative.max()) < 10 * tol
    assert float(u[:, 1:-1, 1:-1].min()) > 0  # maximum principle: f > 0 gives u > 0 inside
    # The dense solve agrees with CG.
    dense = pde.solve_darcy(a, method="dense")
    np.testing.assert_allclose(dense, u, rtol=1e-3, atol=1e-7)


@pytest.mark.skipif(not hasattr(jax, "enable_x64"), reason="needs jax.enable_x64")
def test_darcy_float64_meets_tight_tolerance():
    # float32 caps the residual near eps * cond(A); float64 shows CG honours tol.
    tol = 1e-9
    with jax.enable_x64(True):
        # A fixed two-phase field (layers plus an inclusion), no GRF compile needed.
        nodes = np.linspace(0, 1, 16)
        xx, yy = np.meshgrid(nodes, nodes, indexing="ij")
        a = np.where((xx < 0.5) ^ ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05), 12.0, 3.0)
        a = jnp.asarray(np.stack([a, a.T]), jnp.float64)
        u = pde.solve_darcy(a, tol)
        assert u.dtype == jnp.float64
        residual = pde.darcy_residual(a, u)
        relative = jnp.linalg.norm(residual.reshape(2, -1), axis=1) / 14.0
        assert float(relative.max()) < 10 * tol


def test_darcy_dataset_determinism():
    a1, u1 = pde.darcy_dataset(3, 16, seed=7)
    a2, u2 = pde.darcy_dataset(3, 16, seed=7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(u1, u2)
    a3, _ = pde.darcy_dataset(3, 16, seed=8)
    assert not np.array_equal(a1, a3)


def test_normalizer_round_trip():
    a, _ = pde.darcy_dataset(3, 16, seed=1)
    for pointwise in (False, True):
        norm = pde.UnitGaussianNormalizer.fit(a, pointwise=pointwise)
        encoded = norm.encode(a)
        assert abs(float(jnp.mean(encoded))) < 1e-4
        np.testing.assert_allclose(norm.decode(encoded), a, rtol=1e-5, atol=1e-5)
    # Per-channel statistics apply at any resolution.
    coarse = pde.UnitGaussianNormalizer.fit(a)
    assert coarse.encode(jnp.ones((1, 24, 24, 1))).shape == (1, 24, 24, 1)

"""PDE data for neural-operator training, generated on the machine in JAX.

Two standard Fourier Neural Operator benchmarks (Li et al., 2021), produced
deterministically from a seed, so no data set has to be downloaded:

* 1-D viscous Burgers on the periodic interval [0, 1):
  ``u_t + u u_x = nu u_xx``; the operator learned is ``u(., 0) -> u(., T)``.
  Solved pseudo-spectrally with exponential time differencing RK4 (ETDRK4,
  Cox & Matthews 2002, coefficients by the contour integral of Kassam &
  Trefethen 2005) and 2/3-rule dealiasing.
* 2-D Darcy flow on the unit square: ``-div(a(x) grad u(x)) = f`` with
  ``f = 1`` and ``u = 0`` on the boundary; the operator learned is ``a -> u``.
  The permeability ``a`` is a thresholded Gaussian random field (12 where the
  field is >= 0, 3 elsewhere). Discretised with the 5-point finite-volume
  stencil and solved with Jacobi-preconditioned conjugate gradient
  (matrix-free) or a dense solve for tiny grids.

All generators return ``float32`` ``jax.Array`` s in channels-last layout,
``(n_samples, *spatial, 1)``, which is what :class:`models.fno.FNO` consumes.

Example:
    >>> from tasks.fno import pde
    >>> x, y = pde.burgers_dataset(8, 64, seed=0)
    >>> x.shape, y.shape
    ((8, 64, 1), (8, 64, 1))
    >>> a, u = pde.darcy_dataset(4, 16, seed=0)
    >>> a.shape, u.shape
    ((4, 16, 16, 1), (4, 16, 16, 1))
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "UnitGaussianNormalizer",
    "burgers_dataset",
    "burgers_initial_conditions",
    "darcy_dataset",
    "darcy_operator",
    "darcy_permeability",
    "darcy_residual",
    "solve_burgers",
    "solve_darcy",
]


# ---------------------------------------------------------------------------
# 1-D viscous Burgers
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n_samples", "resolution", "n_modes"))
def burgers_initial_conditions(
    key: jax.Array,
    n_samples: int,
    resolution: int,
    *,
    scale: float = 25.0,
    tau: float = 5.0,
    alpha: float = 2.0,
    n_modes: int = 512,
) -> jax.Array:
    """Samples periodic Gaussian random fields on the grid ``x_j = j / resolution``.

    The field has mean zero and covariance ``scale**2 (-Laplacian + tau**2 I)**(-alpha)``
    on [0, 1) with periodic boundary conditions; the FNO paper's Burgers data uses
    ``625 (-Laplacian + 25 I)**(-2)``, i.e. the defaults. In the orthonormal Fourier
    basis ``sqrt(2) cos(2 pi k x), sqrt(2) sin(2 pi k x)`` the coefficients are
    independent normals with standard deviation
    ``sigma_k = scale * ((2 pi k)**2 + tau**2)**(-alpha / 2)``, k >= 1.

    The coefficients of ``k = 1..n_modes`` are drawn whatever the resolution, and
    the grid keeps those below its Nyquist frequency, so one key gives the same
    function sampled at every resolution (for zero-shot super-resolution tests).

    Args:
      key: PRNG key.
      n_samples: Number of fields.
      resolution: Number of grid points (even).
      scale: Amplitude ``scale`` of the covariance operator.
      tau: Inverse length scale.
      alpha: Smoothness exponent (> 1/2 for a continuous field).
      n_modes: Number of Fourier modes drawn (with the defaults the truncated
        tail has an rms amplitude of about 3e-5).

    Returns:
      ``(n_samples, resolution)`` float32 array.
    """
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("resolution", resolution)
    _check_positive_int("n_modes", n_modes)
    k = jnp.arange(1, n_modes + 1, dtype=jnp.float32)
    sigma = scale * ((2.0 * jnp.pi * k) ** 2 + tau**2) ** (-alpha / 2.0)
    cos_key, sin_key = jax.random.split(key)
    cos_coef = jax.random.normal(cos_key, (n_samples, n_modes), jnp.float32)
    sin_coef = jax.random.normal(sin_key, (n_samples, n_modes), jnp.float32)
    # irfft gives (2/N) Re(c_k e^{2 pi i k x}); c_k = N sigma_k (a_k - i b_k) / sqrt(2)
    # makes that sqrt(2) sigma_k (a_k cos + b_k sin).
    coefficients = resolution * sigma * (cos_coef - 1j * sin_coef) / math.sqrt(2.0)
    # The grid holds k < N/2; the mean (k = 0) and the Nyquist mode carry no energy.
    kept = min(n_modes, (resolution - 1) // 2)
    coefficients = coefficients[:, :kept]
    n_freq = resolution // 2 + 1
    coefficients = jnp.pad(coefficients, ((0, 0), (1, n_freq - 1 - kept)))
    return jnp.fft.irfft(coefficients, n=resolution, axis=-1).astype(jnp.float32)


def _etdrk4_coefficients(
    resolution: int, viscosity: float, dt: float, n_contour: int = 64
) -> dict[str, np.ndarray]:
    """ETDRK4 coefficients for the diagonal linear operator ``L_k = -nu (2 pi k)^2``.

    The phi-functions ``(e^z - 1)/z`` etc. cancel catastrophically for small
    ``|z|``; Kassam & Trefethen evaluate them as means over a circle of radius 1
    around each ``z = dt L_k`` (Cauchy's integral formula), which is accurate for
    every ``z`` including 0. Computed once on the host in float64.
    """
    wavenumber = 2.0 * np.pi * np.arange(resolution // 2 + 1, dtype=np.float64)
    linear = -viscosity * wavenumber**2
    z = dt * linear
    # Points on the upper half circle suffice because L is real (take real parts).
    roots = np.exp(1j * np.pi * (np.arange(1, n_contour + 1) - 0.5) / n_contour)
    lr = z[:, None] + roots[None, :]
    exp_lr = np.exp(lr)
    mean_real = lambda v: np.real(np.mean(v, axis=1))  # noqa: E731
    return {
        "e": np.exp(z),
        "e_half": np.exp(z / 2.0),
        "q": dt * mean_real((np.exp(lr / 2.0) - 1.0) / lr),
        "f1": dt * mean_real((-4.0 - lr + exp_lr * (4.0 - 3.0 * lr + lr**2)) / lr**3),
        "f2": dt * mean_real((2.0 + lr + exp_lr * (-2.0 + lr)) / lr**3),
        "f3": dt * mean_real((-4.0 - 3.0 * lr - lr**2 + exp_lr * (4.0 - lr)) / lr**3),
    }


@jax.jit
def _burgers_etdrk4(u0: jax.Array, coefficients: dict, n_steps: jax.Array) -> jax.Array:
    # n_steps is traced (a while loop), so new step counts or times do not recompile.
    resolution = u0.shape[-1]
    n_freq = resolution // 2 + 1
    k = jnp.arange(n_freq)
    # 2/3 rule: products of modes |k| <= N/3 alias only onto modes that are discarded.
    dealias = (k <= resolution // 3).astype(jnp.float32)
    # -(1/2) d/dx (u^2) in Fourier space, with the derivative 2 pi i k.
    derivative = -0.5j * (2.0 * jnp.pi * k) * dealias

    def nonlinear(v_hat):
        u = jnp.fft.irfft(v_hat, n=resolution, axis=-1)
        return derivative * jnp.fft.rfft(u * u, axis=-1)

    c = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), coefficients)

    def step(_, v):
        nv = nonlinear(v)
        a = c["e_half"] * v + c["q"] * nv
        na = nonlinear(a)
        b = c["e_half"] * v + c["q"] * na
        nb = nonlinear(b)
        cc = c["e_half"] * a + c["q"] * (2.0 * nb - nv)
        nc = nonlinear(cc)
        return c["e"] * v + c["f1"] * nv + 2.0 * c["f2"] * (na + nb) + c["f3"] * nc

    v_hat = jnp.fft.rfft(u0.astype(jnp.float32), axis=-1)
    v_hat = jax.lax.fori_loop(0, n_steps, step, v_hat)
    return jnp.fft.irfft(v_hat, n=resolution, axis=-1)


def solve_burgers(u0: jax.Array, viscosity: float, t_final: float, n_steps: int) -> jax.Array:
    """Solves periodic viscous Burgers ``u_t + u u_x = nu u_xx`` on [0, 1).

    Pseudo-spectral in space (``N`` equispaced points ``x_j = j / N``, 2/3-rule
    dealiasing of ``(u^2)_x``) and ETDRK4 in time: in Fourier space
    ``v_t = L v + N(v)`` with ``L_k = -nu (2 pi k)^2`` integrated exactly and
    ``N(v) = -(i pi k) FFT(u^2)`` treated with fourth-order exponential
    Runge-Kutta, so the stiff diffusion puts no limit on the step; the explicit
    advection needs roughly ``dt * max|u| * 2 pi N / 3 <~ 2``.

    The mean ``int u dx`` is conserved exactly (the k = 0 mode has no
    nonlinear forcing) and ``int u^2 dx`` decays for ``nu > 0``.

    Args:
      u0: Initial values, shape ``(..., N)`` (any leading batch axes), N even.
      viscosity: ``nu >= 0``, a Python number (coefficients are precomputed).
      t_final: Final time ``T >= 0``.
      n_steps: Number of time steps, ``dt = T / n_steps``.

    Returns:
      ``u(., T)`` with the shape of ``u0``, float32.

    Raises:
      ValueError: For a negative viscosity or time, a non-positive step count,
        or an odd resolution.
    """
    if float(viscosity) < 0:
        raise ValueError(f"viscosity must be >= 0, got {viscosity}")
    if float(t_final) < 0:
        raise ValueError(f"t_final must be >= 0, got {t_final}")
    _check_positive_int("n_steps", n_steps)
    resolution = u0.shape[-1]
    if resolution < 4 or resolution % 2:
        raise ValueError(f"u0.shape[-1] (resolution) must be even and >= 4, got {resolution}")
    coefficients = _etdrk4_coefficients(resolution, float(viscosity), float(t_final) / n_steps)
    return _burgers_etdrk4(jnp.asarray(u0), coefficients, jnp.asarray(n_steps, jnp.int32))


def burgers_dataset(
    n_samples: int,
    resolution: int,
    *,
    viscosity: float = 0.1,
    t_final: float = 1.0,
    seed: int = 0,
    solver_resolution: int | None = None,
    n_steps: int | None = None,
    cfl: float = 0.5,
    start: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Pairs ``(u(., 0), u(., T))`` of 1-D viscous Burgers, as in the FNO paper.

    Initial conditions come from :func:`burgers_initial_conditions` (covariance
    ``625 (-Laplacian + 25 I)**(-2)``) sampled on a fine grid of
    ``solver_resolution`` points, are solved there with :func:`solve_burgers`,
    and both ends are subsampled to ``resolution`` points (``x_j = j / resolution``).

    The initial conditions do not depend on the grid, so ``(n_samples, seed)``
    at another resolution gives the same problems on another grid (zero-shot
    super-resolution test sets); ``start`` returns only the samples
    ``start..n_samples-1`` of that draw, solving only those (with the time step
    the whole draw would get, so they equal the tail of the full data set).

    Args:
      n_samples: Number of pairs.
      resolution: Output grid size; must divide ``solver_resolution``.
      viscosity: ``nu``; 0.1 is the FNO paper's setting (u(T) is then ~50x
        smaller than u0: normalise), 0.01 keeps steeper fronts (the default
        solver grid of 256 still agrees with 1024 to ~1e-4 relative at T = 1;
        smaller viscosities need a finer ``solver_resolution``).
      t_final: ``T``.
      seed: Seed of the initial conditions; same seed, same arrays.
      solver_resolution: Grid of the solver. Default: the smallest multiple of
        ``resolution`` that is >= 256.
      n_steps: Time steps. Default from the advective limit,
        ``dt = cfl / (solver_resolution * max|u0|)``, capped at ``dt <= 0.01``.
      cfl: Courant number used when ``n_steps`` is None.
      start: First sample returned (0 <= start < n_samples).

    Returns:
      ``(x, y)``, each ``(n_samples - start, resolution, 1)`` float32.
    """
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("resolution", resolution)
    _check_start(start, n_samples)
    if resolution % 2:
        raise ValueError(f"resolution must be even, got {resolution}")
    if solver_resolution is None:
        solver_resolution = resolution * max(1, -(-256 // resolution))
    _check_positive_int("solver_resolution", solver_resolution)
    if solver_resolution % resolution or solver_resolution % 2:
        raise ValueError(
            f"solver_resolution must be an even multiple of resolution={resolution}, "
            f"got {solver_resolution}"
        )
    if not cfl > 0:
        raise ValueError(f"cfl must be > 0, got {cfl}")
    u0 = burgers_initial_conditions(jax.random.key(seed), n_samples, solver_resolution)
    if n_steps is None:
        # Burgers obeys a maximum principle, so max|u0| bounds the speed for all t.
        max_speed = max(float(jnp.max(jnp.abs(u0))), 1e-6)
        dt = min(cfl / (solver_resolution * max_speed), 0.01)
        n_steps = max(1, math.ceil(t_final / dt))
    u0 = u0[start:]
    u_final = solve_burgers(u0, viscosity, t_final, n_steps)
    stride = solver_resolution // resolution
    x = u0[:, ::stride, None].astype(jnp.float32)
    y = u_final[:, ::stride, None].astype(jnp.float32)
    return x, y


# ---------------------------------------------------------------------------
# 2-D Darcy flow
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n_samples", "resolution", "n_modes", "start"))
def darcy_permeability(
    key: jax.Array,
    n_samples: int,
    resolution: int,
    *,
    alpha: float = 2.0,
    tau: float = 3.0,
    high: float = 12.0,
    low: float = 3.0,
    n_modes: int = 32,
    start: int = 0,
) -> jax.Array:
    """Piecewise-constant permeability: a thresholded Gaussian random field.

    The field ``g ~ N(0, (-Laplacian + tau^2 I)^(-alpha))`` with Neumann boundary
    conditions is expanded in the cosine basis ``cos(pi k1 x) cos(pi k2 y)`` with
    independent normal coefficients scaled by
    ``tau^(alpha-1) (pi^2 (k1^2 + k2^2) + tau^2)^(-alpha/2)`` (mean mode removed),
    as in the FNO paper's Darcy data; then ``a = high`` where ``g >= 0`` and
    ``a = low`` elsewhere. The ``n_modes x n_modes`` coefficients do not depend on
    the resolution, so one key gives the same field sampled at every resolution.

    Args:
      key: PRNG key.
      n_samples: Number of fields.
      resolution: Nodes per side; node ``i`` sits at ``i / (resolution - 1)``.
      alpha: Smoothness exponent of the field.
      tau: Inverse length scale of the field.
      high: Permeability where the field is non-negative.
      low: Permeability where the field is negative.
      n_modes: Cosine modes per axis (coefficient decay makes the rest negligible
        for the sign of the field away from its zero set).
      start: Return only the fields ``start..n_samples-1`` of the ``n_samples``
        drawn from ``key`` (0 <= start < n_samples).

    Returns:
      ``(n_samples - start, resolution, resolution)`` float32 array of ``high``/``low``.
    """
    _check_positive_int("n_samples", n_samples)
    if resolution < 3:
        raise ValueError(f"resolution must be >= 3, got {resolution}")
    _check_positive_int("n_modes", n_modes)
    _check_start(start, n_samples)
    k = jnp.arange(n_modes, dtype=jnp.float32)
    nodes = jnp.linspace(0.0, 1.0, resolution, dtype=jnp.float32)
    cosine_basis = jnp.cos(jnp.pi * nodes[:, None] * k[None, :])  # (node, mode)
    k1, k2 = jnp.meshgrid(k, k, indexing="ij")
    coef = tau ** (alpha - 1.0) * (jnp.pi**2 * (k1**2 + k2**2) + tau**2) ** (-alpha / 2.0)
    coef = coef.at[0, 0].set(0.0)
    xi = jax.random.normal(key, (n_samples, n_modes, n_modes), jnp.float32)[start:]
    field = jnp.einsum("ik,nkl,jl->nij", cosine_basis, coef * xi, cosine_basis)
    return jnp.where(field >= 0, high, low).astype(jnp.float32)


def _face_coefficients(a: jax.Array, face_average: str) -> tuple[jax.Array, jax.Array]:
    """Permeability on the faces between neighbouring nodes, along x and along y."""
    if face_average == "harmonic":
        # Harmonic means are exact for 1-D flux through two layers in series,
        # the right average across the jumps of a piecewise-constant a.
        mean = lambda p, q: 2.0 * p * q / (p + q)  # noqa: E731
    elif face_average == "arithmetic":
        mean = lambda p, q: 0.5 * (p + q)  # noqa: E731
    else:
        raise ValueError(f"face_average must be 'harmonic' or 'arithmetic', got {face_average!r}")
    return mean(a[1:, :], a[:-1, :]), mean(a[:, 1:], a[:, :-1])


def darcy_operator(a: jax.Array, u: jax.Array, *, face_average: str = "harmonic") -> jax.Array:
    """Applies the discrete ``-div(a grad u)`` at the interior nodes.

    With node spacing ``h = 1 / (n - 1)`` and face permeabilities
    ``a_{i+1/2,j}`` (harmonic or arithmetic mean of the two nodes),
    ``(A u)_{ij} = -[a_{i+1/2,j}(u_{i+1,j} - u_{ij}) - a_{i-1/2,j}(u_{ij} - u_{i-1,j})
                    + a_{i,j+1/2}(u_{i,j+1} - u_{ij}) - a_{i,j-1/2}(u_{ij} - u_{i,j-1})] / h^2``
    for ``1 <= i, j <= n - 2``. Boundary values of ``u`` enter as given.

    Args:
      a: Permeability on the ``(n, n)`` nodes.
      u: Values on the ``(n, n)`` nodes.
      face_average: "harmonic" or "arithmetic".

    Returns:
      ``(n - 2, n - 2)`` array.
    """
    n = a.shape[-1]
    h = 1.0 / (n - 1)
    a_x, a_y = _face_coefficients(a, face_average)
    flux_x = a_x * (u[1:, :] - u[:-1, :])  # (n-1, n), on faces i+1/2
    flux_y = a_y * (u[:, 1:] - u[:, :-1])  # (n, n-1), on faces j+1/2
    divergence = (flux_x[1:, 1:-1] - flux_x[:-1, 1:-1]) + (flux_y[1:-1, 1:] - flux_y[1:-1, :-1])
    return -divergence / h**2


def darcy_residual(
    a: jax.Array, u: jax.Array, *, forcing: float = 1.0, face_average: str = "harmonic"
) -> jax.Array:
    """Discrete residual ``A u - f`` at the interior nodes (see :func:`darcy_operator`).

    Args:
      a: Permeability, ``(..., n, n)`` or ``(..., n, n, 1)``.
      u: Solution on the same grid (boundary nodes should be 0).
      forcing: Constant right-hand side ``f``.
      face_average: "harmonic" or "arithmetic"; must match the solve.

    Returns:
      ``(..., n - 2, n - 2)`` residuals.
    """
    return _darcy_residual(_drop_channel(a), _drop_channel(u), forcing, face_average)


@functools.partial(jax.jit, static_argnames=("face_average",))
def _darcy_residual(a, u, forcing, face_average):
    operator = functools.partial(darcy_operator, face_average=face_average)
    for _ in range(a.ndim - 2):
        operator = jax.vmap(operator)
    return operator(a, u) - forcing


def _solve_darcy_single(a, tol, forcing, method, maxiter, face_average):
    n = a.shape[-1]
    interior = (n - 2, n - 2)
    rhs = jnp.full(interior, 1, a.dtype) * jnp.asarray(forcing, a.dtype)

    def apply_a(v):  # v lives on the interior; the boundary is the zero Dirichlet data
        return darcy_operator(a, jnp.pad(v, 1), face_average=face_average)

    if method == "dense":
        size = (n - 2) ** 2
        basis = jnp.eye(size, dtype=a.dtype).reshape(size, *interior)
        matrix = jax.vmap(apply_a)(basis).reshape(size, size).T
        solution = jnp.linalg.solve(matrix, rhs.reshape(size)).reshape(interior)
    else:
        a_x, a_y = _face_coefficients(a, face_average)
        h2 = (1.0 / (n - 1)) ** 2
        diagonal = (a_x[1:, 1:-1] + a_x[:-1, 1:-1] + a_y[1:-1, 1:] + a_y[1:-1, :-1]) / h2
        # Jacobi preconditioning removes the 12/3 contrast from the conditioning.
        solution, _ = jax.scipy.sparse.linalg.cg(
            apply_a, rhs, tol=tol, maxiter=maxiter, M=lambda r: r / diagonal
        )
    return jnp.pad(solution, 1)


# tol and forcing are traced: changing them does not recompile.
@functools.partial(jax.jit, static_argnames=("method", "maxiter", "face_average"))
def _solve_darcy_batched(a, tol, forcing, method, maxiter, face_average):
    solve = functools.partial(
        _solve_darcy_single,
        tol=tol,
        forcing=forcing,
        method=method,
        maxiter=maxiter,
        face_average=face_average,
    )
    leading = a.shape[:-2]
    flat = a.reshape(-1, *a.shape[-2:])
    return jax.vmap(solve)(flat).reshape(*leading, *a.shape[-2:])


def solve_darcy(
    a: jax.Array,
    tol: float = 1e-5,
    *,
    forcing: float = 1.0,
    method: str = "cg",
    maxiter: int | None = None,
    face_average: str = "harmonic",
) -> jax.Array:
    """Solves ``-div(a grad u) = f`` on [0,1]^2 with ``u = 0`` on the boundary.

    Discretised with :func:`darcy_operator` on the nodes ``(i, j) / (n - 1)``;
    the ``(n - 2)^2`` interior unknowns solve the symmetric positive definite
    system ``A u = f``.

    Note: in float32 no iterate can have a true relative residual much below
    ``eps * cond(A)`` (about 1e-5 at n = 16, 1e-4 at n = 32, growing like
    ``n^2``): the rounding of ``u`` alone, multiplied by entries of size
    ``a / h^2``, leaves that much. The solution error is far smaller than the
    discretisation error either way. Enable x64 and pass float64 ``a`` for
    tighter residuals.

    Args:
      a: Permeability on the nodes, ``(..., n, n)`` or ``(..., n, n, 1)``.
      tol: Relative residual tolerance of CG, ``||f - A u|| <= tol ||f||``
        (as measured by CG's recursive residual).
      forcing: Constant right-hand side ``f``.
      method: "cg" (matrix-free, Jacobi-preconditioned conjugate gradient,
        jax.scipy.sparse.linalg.cg) or "dense" (assembles the
        ``(n-2)^2 x (n-2)^2`` matrix; tiny grids only).
      maxiter: CG iteration cap (default ``10 (n-2)^2``).
      face_average: "harmonic" or "arithmetic" face permeabilities.

    Returns:
      ``u`` with the shape of ``a`` (zero on the boundary nodes).
    """
    if method not in ("cg", "dense"):
        raise ValueError(f"method must be 'cg' or 'dense', got {method!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if face_average not in ("harmonic", "arithmetic"):
        raise ValueError(f"face_average must be 'harmonic' or 'arithmetic', got {face_average!r}")
    a = jnp.asarray(a)
    has_channel = a.ndim >= 3 and a.shape[-1] == 1 and a.shape[-2] != 1
    grid = _drop_channel(a)
    if grid.ndim < 2 or grid.shape[-1] != grid.shape[-2] or grid.shape[-1] < 3:
        raise ValueError(f"a must have square spatial shape (n, n) with n >= 3, got {a.shape}")
    u = _solve_darcy_batched(
        grid,
        jnp.asarray(tol, grid.dtype),
        jnp.asarray(forcing, grid.dtype),
        method,
        maxiter,
        face_average,
    )
    return u[..., None] if has_channel else u


def darcy_dataset(
    n_samples: int,
    resolution: int,
    *,
    seed: int = 0,
    tol: float = 1e-5,
    method: str = "cg",
    face_average: str = "harmonic",
    start: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Pairs ``(a, u)`` of 2-D Darcy flow, as in the FNO paper (at small resolution).

    ``a`` from :func:`darcy_permeability` (12 / 3), ``u`` from :func:`solve_darcy`
    with ``f = 1`` and zero Dirichlet boundary. Grids include the boundary nodes,
    so ``u`` is 0 on the outer ring, like the paper's data.

    The permeabilities do not depend on the grid, so ``(n_samples, seed)`` at
    another resolution gives the same problems solved on another grid (zero-shot
    super-resolution test sets); ``start`` returns only the samples
    ``start..n_samples-1`` of that draw and solves only those.

    Args:
      n_samples: Number of pairs.
      resolution: Nodes per side (>= 3).
      seed: Seed of the permeabilities; same seed, same arrays.
      tol: CG relative tolerance.
      method: "cg" or "dense" (see :func:`solve_darcy`).
      face_average: "harmonic" or "arithmetic".
      start: First sample returned (0 <= start < n_samples).

    Returns:
      ``(a, u)``, each ``(n_samples - start, resolution, resolution, 1)`` float32.
    """
    a = darcy_permeability(jax.random.key(seed), n_samples, resolution, start=start)
    u = solve_darcy(a, tol, method=method, face_average=face_average)
    return a[..., None], u[..., None].astype(jnp.float32)


# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------


class UnitGaussianNormalizer(NamedTuple):
    """Shift and scale fitted on training data: ``encode(x) = (x - mean) / scale``.

    A NamedTuple of arrays, so it is a pytree that can be passed through
    ``jax.jit`` and checkpointed.

    Example:
        >>> import jax.numpy as jnp
        >>> norm = UnitGaussianNormalizer.fit(jnp.arange(8.0).reshape(4, 2, 1))
        >>> bool(jnp.allclose(norm.decode(norm.encode(jnp.ones((1, 2, 1)))), 1.0))
        True
    """

    mean: jax.Array
    scale: jax.Array  # std + eps

    @classmethod
    def fit(
        cls, x: jax.Array, *, pointwise: bool = False, eps: float = 1e-5
    ) -> "UnitGaussianNormalizer":
        """Fits mean and standard deviation on ``x`` of shape ``(batch, *spatial, channels)``.

        Args:
          x: Training inputs.
          pointwise: If True, one mean/std per grid point and channel (the FNO
            paper's normaliser; tied to the training resolution). If False, one
            per channel, reduced over batch and space, which works at any
            resolution.
          eps: Added to the standard deviation.
        """
        axes = (0,) if pointwise else tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes, keepdims=True)[0]
        std = jnp.std(x, axis=axes, keepdims=True)[0]
        return cls(mean=mean, scale=std + eps)

    def encode(self, x: jax.Array) -> jax.Array:
        return (x - self.mean) / self.scale

    def decode(self, x: jax.Array) -> jax.Array:
        return x * self.scale + self.mean


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_start(start, n_samples: int) -> None:
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool):
        raise ValueError(f"start must be an integer, got {start!r}")
    if not 0 <= start < n_samples:
        raise ValueError(f"start must be in [0, n_samples={n_samples}), got {start}")


def _drop_channel(x: jax.Array) -> jax.Array:
    """(..., n, n, 1) -> (..., n, n); (..., n, n) unchanged."""
    x = jnp.asarray(x)
    if x.ndim >= 3 and x.shape[-1] == 1 and x.shape[-2] != 1:
        return x[..., 0]
    return x

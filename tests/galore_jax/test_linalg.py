"""linalg: randomized vs exact SVD, warm start, sign rule, HOSVD vs a float64 NumPy HOSVD."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import galore_jax as gj
from galore_jax import linalg


def _gapped_matrix(rng, m, n, rank, gap=10.0, complex_=False):
    """m x n matrix whose top `rank` singular values sit a factor `gap` above the rest."""

    def orth(k, cols):
        x = rng.normal(size=(k, cols))
        if complex_:
            x = x + 1j * rng.normal(size=(k, cols))
        return np.linalg.qr(x)[0]

    k = min(m, n)
    s = np.concatenate([np.linspace(2.0, 1.0, rank) * gap, rng.uniform(0.0, 1.0, k - rank)])
    return (orth(m, k) * s) @ orth(n, k).conj().T


def _max_sine(basis, reference):
    """Largest principal-angle sine between the column spans of two orthonormal bases."""
    basis = np.asarray(basis, np.complex128)
    reference = np.asarray(reference, np.complex128)
    residual = basis - reference @ (reference.conj().T @ basis)
    return np.linalg.svd(residual, compute_uv=False).max()


@pytest.mark.parametrize(
    "shape,rank,complex_", [((200, 120), 10, False), ((96, 300), 16, False), ((80, 64), 8, True)]
)
def test_randomized_spans_exact_subspace(shape, rank, complex_):
    rng = np.random.default_rng(0)
    a = _gapped_matrix(rng, *shape, rank, complex_=complex_)
    dtype = jnp.complex64 if complex_ else jnp.float32
    u, s, vt = gj.linalg.randomized_svd(jnp.asarray(a, dtype), rank, key=jax.random.PRNGKey(1))
    u_ref, s_ref, vt_ref = np.linalg.svd(a)
    assert _max_sine(u, u_ref[:, :rank]) <= 1e-2
    assert _max_sine(np.conj(vt).T, np.conj(vt_ref[:rank]).T) <= 1e-2
    np.testing.assert_allclose(np.asarray(s), s_ref[:rank], rtol=1e-3)
    gram = np.asarray(u).conj().T @ np.asarray(u)
    np.testing.assert_allclose(gram, np.eye(rank), atol=1e-5)


def _primitive_count(fn, name, *args) -> int:
    """`name` primitives in the traced function, sub-jaxprs (jit, cond branches) included."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name == name
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += count(sub)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _cholesky_count(fn, *args) -> int:
    return _primitive_count(fn, "cholesky", *args)


@pytest.mark.parametrize("warm", [False, True])
def test_one_intermediate_pass_halves_the_factorisations_and_keeps_the_subspace(warm):
    rng = np.random.default_rng(3)
    a_np = _gapped_matrix(rng, 160, 120, 12, gap=10.0)
    a = jnp.asarray(a_np, jnp.float32)
    key = jax.random.PRNGKey(2)
    u_ref = np.linalg.svd(a_np)[0][:, :12]
    init = jnp.asarray(np.linalg.qr(u_ref + 0.3 * rng.normal(size=u_ref.shape))[0], jnp.float32)
    init = init if warm else None
    bases, counts = {}, {}
    for passes in (1, 2):
        fn = lambda x, p=passes: gj.linalg.top_left_basis(
            x, 12, key=key, init=init, power_iters=1, intermediate_passes=p
        )
        bases[passes] = np.asarray(fn(a), np.float64)
        counts[passes] = _cholesky_count(fn, a)
        np.testing.assert_allclose(bases[passes].T @ bases[passes], np.eye(12), atol=1e-5)
        assert _max_sine(bases[passes], u_ref) <= 1e-2
    # Between products: 2 blocks (3 with init) at 1 pass instead of 2; the final block
    # keeps 2 passes and its completion (lax.cond branch) 2 more.
    between = 3 if warm else 2
    assert counts[2] - counts[1] == between
    assert counts[2] == 2 * between + 2 + 2
    energy = {p: np.linalg.norm(b.T @ a_np) ** 2 for p, b in bases.items()}
    assert abs(energy[1] - energy[2]) <= 1e-5 * energy[2]


def test_intermediate_passes_is_checked_early():
    with pytest.raises(ValueError, match="RandomizedSVD.passes must be <= 2, got 3"):
        gj.galore_adamw(1e-3, svd=gj.RandomizedSVD(passes=3))
    with pytest.raises(ValueError, match="RandomizedSVD.passes must be >= 1"):
        with pytest.warns(DeprecationWarning, match="intermediate_passes= -> svd.passes"):
            gj.scale_by_galore(4, intermediate_passes=0)  # 0.2.0's spelling


def test_eigh_implementation_is_checked_and_named():
    """A bad value is refused at construction; Jacobi where XLA has none (CPU) is one
    ValueError naming the option when the refresh is traced, not a lowering error."""
    with pytest.raises(ValueError, match=r"RandomizedSVD.eigh must be one of \(None, 'qr'"):
        gj.galore_adamw(1e-3, svd=gj.RandomizedSVD(eigh="syevj"))
    with pytest.raises(ValueError, match="RandomizedSVD.eigh must be one of"):
        gj.scale_by_galore(4, svd=gj.RandomizedSVD(eigh="QR"))
    with (
        pytest.raises(ValueError, match=r"applies to svd='randomized'"),
        pytest.warns(DeprecationWarning),
    ):
        gj.galore_adamw(1e-3, svd="exact", eigh_implementation="qr")
    a = jnp.asarray(np.random.default_rng(0).normal(size=(3, 40, 30)), jnp.float32)
    key = jax.random.PRNGKey(1)
    default = gj.linalg.top_left_basis(a, 6, key=key)
    # "qr" is the CPU / GPU default algorithm: the same basis, bit for bit.
    np.testing.assert_array_equal(
        gj.linalg.top_left_basis(a, 6, key=key, eigh_implementation="qr"), default
    )
    if jax.default_backend() == "cpu":
        tx = gj.galore_adamw(1e-3, rank=4, eigh_implementation="jacobi")
        params = {"w": a[0]}
        with pytest.raises(
            ValueError, match="eigh_implementation='jacobi' is not available on cpu"
        ):
            jax.jit(tx.update)(params, tx.init(params), params)
    else:  # GPU / TPU: Jacobi's basis spans the default's subspace
        jacobi = gj.linalg.top_left_basis(a, 6, key=key, eigh_implementation="jacobi")
        assert (
            _max_sine(np.asarray(jacobi[0], np.float64), np.asarray(default[0], np.float64)) < 1e-3
        )


def test_randomized_batched_and_vmapped_agree():
    rng = np.random.default_rng(1)
    stack = jnp.asarray(np.stack([_gapped_matrix(rng, 64, 48, 6) for _ in range(3)]), jnp.float32)
    key = jax.random.PRNGKey(0)
    batched = gj.linalg.top_left_basis(stack, 6, key=key, power_iters=2)
    vmapped = jax.vmap(lambda a: gj.linalg.top_left_basis(a, 6, key=key, power_iters=2))(stack)
    for layer in range(3):
        exact = np.linalg.svd(np.asarray(stack[layer], np.float64))[0][:, :6]
        assert _max_sine(batched[layer], exact) <= 1e-2
        assert _max_sine(vmapped[layer], exact) <= 1e-2


def test_warm_start_needs_fewer_power_iterations():
    """A slowly moving subspace (as between GaLore refreshes): warm start with 0 power
    iterations is more accurate than a cold start with 1."""
    rng = np.random.default_rng(2)
    m, n, rank = 300, 200, 20
    # Slowly decaying spectrum: no big gap, where power iterations matter.
    s = 1.0 / np.sqrt(np.arange(1, n + 1))
    u0 = np.linalg.qr(rng.normal(size=(m, n)))[0]
    v0 = np.linalg.qr(rng.normal(size=(n, n)))[0]
    old = (u0 * s) @ v0.T
    new = old + 0.02 * rng.normal(size=(m, n)) / np.sqrt(m)
    exact_new = np.linalg.svd(new)[0][:, :rank]
    prev_basis = jnp.asarray(np.linalg.svd(old)[0][:, :rank], jnp.float32)
    a = jnp.asarray(new, jnp.float32)

    def error(power_iters, init):
        basis = gj.linalg.top_left_basis(
            a, rank, key=jax.random.PRNGKey(3), oversample=8, power_iters=power_iters, init=init
        )
        return _max_sine(basis, exact_new)

    cold = [error(q, None) for q in range(3)]
    warm0 = error(0, prev_basis)
    assert cold[0] > cold[1] > cold[2]  # power iterations help a cold start
    assert warm0 < cold[1], (warm0, cold)
    assert warm0 < 0.2


def test_exact_svd_matches_numpy_and_sign_rule():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 20))
    u, s, vt = gj.linalg.exact_svd(jnp.asarray(a, jnp.float32), 5)
    u_np, s_np, vt_np = np.linalg.svd(a)
    flip = np.sign(u_np[np.argmax(np.abs(u_np[:, :5]), axis=0), np.arange(5)])
    np.testing.assert_allclose(np.asarray(u), u_np[:, :5] * flip, atol=1e-4)
    np.testing.assert_allclose(np.asarray(vt), vt_np[:5] * flip[:, None], atol=1e-4)
    np.testing.assert_allclose(np.asarray(s), s_np[:5], rtol=1e-5)


def test_canonicalize_signs_rule_and_ties():
    basis = jnp.asarray([[0.5, -0.7, 0.5], [-0.5, 0.1, -0.5], [0.1, 0.7, 0.2]])
    out = np.asarray(gj.linalg.canonicalize_signs(basis))
    # column 0: tie between rows 0 and 1 -> first index (0.5) positive: unchanged
    np.testing.assert_allclose(out[:, 0], [0.5, -0.5, 0.1])
    # column 1: tie |-0.7| == |0.7| -> first index (row 0) made positive: flipped
    np.testing.assert_allclose(out[:, 1], [0.7, -0.1, -0.7])
    # column 2: largest is -0.5? no, 0.5 at row 0 (tie with row 1, first wins): unchanged
    np.testing.assert_allclose(out[:, 2], [0.5, -0.5, 0.2])
    complex_basis = jnp.asarray([[1j, 0.1], [0.2, -2.0]], jnp.complex64)
    out = np.asarray(gj.linalg.canonicalize_signs(complex_basis))
    assert abs(out[0, 0] - 1.0) < 1e-6 and abs(out[1, 1] - 2.0) < 1e-6


def test_degenerate_inputs_stay_finite():
    key = jax.random.PRNGKey(0)
    for a in [
        jnp.zeros((40, 30)),
        jnp.ones((40, 30)),
        jax.random.normal(key, (40, 2)) @ jax.random.normal(key, (2, 30)),
    ]:
        for passes in (1, 2):
            u, s, vt = gj.linalg.randomized_svd(a, 5, key=key, intermediate_passes=passes)
            assert np.isfinite(np.asarray(u)).all() and np.isfinite(np.asarray(vt)).all()
            # Directions without energy are completed: always a full orthonormal basis.
            np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)


def test_bf16_input_is_refreshed_in_float32():
    a = jax.random.normal(jax.random.PRNGKey(0), (32, 16)).astype(jnp.bfloat16)
    u, s, vt = gj.linalg.randomized_svd(a, 4, key=jax.random.PRNGKey(1))
    assert u.dtype == jnp.float32 and s.dtype == jnp.float32


def test_orthonormalize_is_orthonormal_for_ill_conditioned_input():
    rng = np.random.default_rng(4)
    y = rng.normal(size=(500, 40)) * np.logspace(0, -4, 40)
    q = np.asarray(linalg.orthonormalize(jnp.asarray(y, jnp.float32), passes=3), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(40), atol=1e-5)
    assert _max_sine(q, np.linalg.qr(y)[0]) < 1e-3


# ----------------------------------------------------------------------------
# HOSVD / Tucker against float64 NumPy.
# ----------------------------------------------------------------------------


def _numpy_hosvd(t, ranks):
    """Reference: factor k = top r_k left singular vectors of the mode-k unfolding,
    each column's largest-magnitude entry made real positive; core = t x_k U_k^H."""
    factors = []
    for mode, r in enumerate(ranks):
        unfolding = np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)
        u = np.linalg.svd(unfolding, full_matrices=False)[0][:, :r]
        pivots = u[np.argmax(np.abs(u), axis=0), np.arange(r)]
        factors.append(u * np.conj(pivots / np.abs(pivots)))
    core = t
    for mode, u in enumerate(factors):
        core = np.moveaxis(np.tensordot(u.conj().T, core, axes=([1], [mode])), 0, mode)
    return core, factors


@pytest.mark.parametrize("shape,ranks", [((8, 7, 6), (4, 3, 3)), ((6, 5, 4, 4), (3, 3, 2, 2))])
@pytest.mark.parametrize("complex_", [False, True])
def test_hosvd_matches_numpy(shape, ranks, complex_):
    rng = np.random.default_rng(5)
    t = rng.normal(size=shape) + (1j * rng.normal(size=shape) if complex_ else 0)
    core_ref, factors_ref = _numpy_hosvd(t, ranks)
    dtype = jnp.complex64 if complex_ else jnp.float32
    core, factors = gj.linalg.hosvd(jnp.asarray(t, dtype), ranks)
    for f, f_ref in zip(factors, factors_ref):
        np.testing.assert_allclose(np.asarray(f), f_ref, atol=2e-4)
    np.testing.assert_allclose(np.asarray(core), core_ref, atol=2e-4 * np.abs(core_ref).max())


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_tucker_roundtrip_of_exactly_low_multilinear_rank(complex_, svd):
    rng = np.random.default_rng(6)
    shape, ranks = (10, 9, 8, 6), (3, 2, 4, 2)
    draw = lambda *s: rng.normal(size=s) + (1j * rng.normal(size=s) if complex_ else 0)
    t = draw(*ranks)
    for mode, (d, r) in enumerate(zip(shape, ranks)):
        t = np.moveaxis(np.tensordot(draw(d, r), t, axes=([1], [mode])), 0, mode)
    dtype = jnp.complex64 if complex_ else jnp.float32
    core, factors = gj.linalg.hosvd(
        jnp.asarray(t, dtype), ranks, svd=svd, key=jax.random.PRNGKey(0)
    )
    back = np.asarray(gj.linalg.tucker_reconstruct(core, factors))
    assert np.linalg.norm(back - t) / np.linalg.norm(t) < 1e-4


def test_mode_unfold_fold_roundtrip():
    t = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    for mode in range(3):
        unfolding = gj.linalg.mode_unfold(t, mode)
        assert unfolding.shape == (t.shape[mode], t.size // t.shape[mode])
        np.testing.assert_array_equal(gj.linalg.mode_fold(unfolding, mode, t.shape), t)


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_cpu_lapack_kernels_get_one_matrix_at_a_time(svd):
    """jaxlib 0.10's CPU LAPACK kernels split a batch over the intra-op pool and block;
    with 8 virtual devices refreshing at once that deadlocks (train.py at rank >= 16 on
    mesh data=2 fsdp=4). Batched refreshes must hand each kernel a single matrix."""
    import re

    a = jnp.ones((4, 64, 48)) + jnp.arange(48.0)
    fn = lambda a: gj.linalg.top_left_basis(a, 16, svd=svd, key=jax.random.PRNGKey(0))
    hlo = jax.jit(fn).lower(a).compile().as_text()
    results = re.findall(r"= \(?\w+\[([\d,]*)\][^\n]*custom_call_target=\"lapack_", hlo)
    assert results, "no LAPACK custom call found"
    assert all(len(dims.split(",")) == 2 for dims in results), results


@pytest.mark.parametrize("warm", [pytest.param(False, marks=pytest.mark.slow), True])
def test_leaves_refreshed_together_share_each_factorisation_call(warm):
    """A model's leaves refresh at one step: sketches of one width (here three leaves of
    different shapes, one projected on the right) share every Cholesky / eigh call; a
    leaf of another width is its own group. Each leaf gets the basis it gets alone."""
    from galore_jax import _matrix_plan as proj

    rng = np.random.default_rng(5)
    shapes = [(3, 32, 48), (3, 32, 80), (80, 32), (12, 40)]  # the last: width 12, not 16
    dims = [gj.DimensionNumbers((0,)), gj.DimensionNumbers((0,)), None, None]
    plans = [
        proj.matrix_plan(s, d, "std", 8, f"p{i}") for i, (s, d) in enumerate(zip(shapes, dims))
    ]
    gs = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    gs = [plan.to_standard(g) for plan, g in zip(plans, gs)]
    keys = [jax.random.PRNGKey(i) for i in range(len(gs))]
    svd = gj.RandomizedSVD(oversample=8, power_iters=1)

    @jax.jit  # each leaf's first basis, alone (eager, this took 11 s of dispatch)
    def first_bases(gs):
        return [
            proj.refresh_projectors(
                [p], [g], [proj.init_projectors(p, jnp.float32)], refresh=svd, keys=[k], warm=False
            )[0]
            for p, g, k in zip(plans, gs, keys)
        ]

    olds = first_bases(gs)
    opts = dict(refresh=svd, warm=warm)

    def together(gs):
        return proj.refresh_projectors(plans, gs, olds, keys=keys, **opts)

    def alone(g, i):
        return proj.refresh_projectors([plans[i]], [g], [olds[i]], keys=[keys[i]], **opts)[0]

    for name in ("cholesky", "eigh"):
        each = [_primitive_count(lambda g, i=i: alone(g, i), name, gs[i]) for i in range(4)]
        # Leaves 0-2 cost what leaf 0 costs alone; leaf 3 adds its own calls.
        assert _primitive_count(together, name, gs) == each[0] + each[3] < sum(each), name
    refreshed = jax.jit(together)(gs)
    for i in (0, 2, 3):  # a stacked leaf, a right-projected one, the other width
        for x, y in zip(refreshed[i], jax.jit(alone, static_argnums=1)(gs[i], i)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)

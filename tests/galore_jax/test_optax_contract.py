"""optax's own contract tests, ported to galore_jax.

Sources: optax/contrib/_common_test.py (run there for `galore` with
learning_rate=1e-2, rank=8) and optax/contrib/_galore_test.py, as shipped in the
optax 0.2.8 wheel. Same problems and tolerances; where our semantics differ on
purpose the test asserts ours and says why in a comment. The last part holds
the contract items of the issue (inject_hyperparams hint, argument checks,
params-free updates, float16, no silent rank clipping) and a trajectory
comparison with `optax.contrib.galore`.

Compiles dominate the run time (a randomized-SVD refresh compiles several times
slower than an exact one), so the shared optimizers use svd="exact" (optax's
galore's only SVD) and the randomized default is exercised by a few tests only;
jitted functions are shared where tests use the same optimizer, and shape-only
checks use `jax.eval_shape`. Projector arrays are looked up by param name, not
by the state's layout.
"""

import ast
import functools
import inspect
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
import pytest
from optax._src import test_utils
from optax._src import utils as optax_utils

import galore_jax as gj

# ----------------------------------------------------------------------------
# Optimizers under test.
# ----------------------------------------------------------------------------

_FACTORIES = {
    # optax's config for galore in _common_test.py.
    "galore_adamw": lambda: gj.galore_adamw(learning_rate=1e-2, rank=8),
    # rank 1 fits every matrix below, so the low-rank path runs on 2x2 / 4x3 leaves.
    "galore_adamw_r1": lambda: gj.galore_adamw(learning_rate=1e-2, rank=1, svd="exact"),
    # Clip factor, lr and decay applied by the fused update (max_grad_norm).
    "galore_adamw_clipped": lambda: gj.galore_adamw(
        learning_rate=1e-2, rank=1, svd="exact", max_grad_norm=1.0, weight_decay=1e-4
    ),
    "tensor_galore_adamw": lambda: gj.tensor_galore_adamw(learning_rate=1e-2, rank=0.5),
    # The bare transform, made an optimizer as optax.contrib.galore does.
    "scale_by_galore": lambda: optax.chain(
        gj.scale_by_galore(rank=1, svd="exact"), optax.scale_by_learning_rate(1e-2)
    ),
}


@functools.lru_cache(maxsize=None)
def _opt(name):
    """(tx, jitted init, jitted update), shared by tests so each compiles once."""
    tx = _FACTORIES[name]()
    return tx, jax.jit(tx.init), jax.jit(tx.update)


def _inner(state, label):
    """The inner state of one partition group of a galore_adamw state."""
    return state[0].inner_states[label].inner_state


def _nd_params(dtype=jnp.float32):
    """A vector, a matrix and a 3-D tensor: Adam, GaLore and Tensor-GaLore leaves.

    The tensor's leading size 3 is also a feature size (w's columns), so it is
    not read as a stack of layers.
    """
    return {
        "v": jnp.array([1.0, 2.0, -1.0], dtype),
        "w": (jnp.arange(12.0).reshape(4, 3) / 6 - 1).astype(dtype),
        "t": (jnp.cos(jnp.arange(24.0)).reshape(3, 4, 2)).astype(dtype),
    }


def _vw(tree):
    """The vector and matrix leaves only (cheaper compiles where Tucker adds nothing)."""
    return {"v": tree["v"], "w": tree["w"]}


def _grads(params):
    """Gradient of sum(p^2), without tracing anything eagerly per test."""
    return jax.tree.map(lambda p: (2 * np.asarray(p, np.float32)).astype(p.dtype), params)


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _arrays_for(tree, key=None):
    """The arrays in `tree` (a projector / factor field) that belong to param `key`."""
    return [
        x
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if key is None or any(getattr(k, "key", None) == key for k in path)
    ]


def _shapes_for(tree, key=None):
    return sorted(tuple(x.shape) for x in _arrays_for(tree, key))


def _sum_sq(tree):
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Targets (as in _common_test.py, plus a 3-D one for Tensor-GaLore).
# ----------------------------------------------------------------------------


def _setup_parabola(dtype):
    initial_params = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
    final_params = jnp.array([1.0, -1.0, 1.0], dtype=dtype)

    def obj_fn(params):
        return jnp.sum(jnp.square(params - final_params))

    return initial_params, final_params, obj_fn


def _setup_rosenbrock(dtype):
    a, b = 1.0, 100.0
    initial_params = jnp.array([0.0, 0.0], dtype=dtype)
    final_params = jnp.array([a, a**2], dtype=dtype)

    def obj_fn(params):
        return jnp.square(a - params[0]) + b * jnp.square(params[1] - params[0] ** 2)

    return initial_params, final_params, obj_fn


def _setup_matrix_parabola(dtype):
    initial_params = jnp.zeros((2, 2), dtype=dtype)
    final_params = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype=dtype)

    def obj_fn(params):
        return jnp.sum(jnp.square(params - final_params))

    return initial_params, final_params, obj_fn


def _setup_mixed_tensor_target(dtype):
    initial_params = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))
    final_params = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

    def obj_fn(params):
        return sum(jnp.sum(jnp.square(p - f)) for p, f in zip(params, final_params))

    return initial_params, final_params, obj_fn


def _setup_mixed_nd_target(dtype):
    """Ours: 1-D, 2-D and 3-D leaves, so each of our treatments has to converge."""
    initial_params = {
        "v": jnp.zeros((3,), dtype),
        "w": jnp.zeros((2, 2), dtype),
        "t": jnp.zeros((2, 3, 4), dtype),
    }
    final_params = {
        "v": jnp.array([1.0, -1.0, 2.0], dtype),
        "w": jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype),
        "t": (jnp.arange(24.0).reshape(2, 3, 4) / 6 - 2).astype(dtype),
    }

    def obj_fn(params):
        return sum(jnp.sum(jnp.square(params[k] - final_params[k])) for k in params)

    return initial_params, final_params, obj_fn


# ============================================================================
# _common_test.py
# ============================================================================


@pytest.mark.parametrize(
    "name,target",
    [
        ("galore_adamw", _setup_rosenbrock),  # optax's problem: all 1-D, plain Adam
        ("galore_adamw_r1", _setup_mixed_nd_target),  # ours: the low-rank paths too
        ("galore_adamw_clipped", _setup_mixed_nd_target),
    ],
)
def test_optimizers_accept_extra_args(name, target):
    tx = _FACTORIES[name]()
    initial_params, _, objective = target(jnp.float32)

    @jax.jit
    def step(params, state):
        updates = jax.grad(objective)(params)
        updates, state = tx.update(
            updates, state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1
        )
        return optax.apply_updates(params, updates), state

    params, state = initial_params, tx.init(initial_params)
    for _ in range(2):
        params, state = step(params, state)

    # The optimizer doesn't recompile on the 2nd call.
    params = initial_params
    state = tx.init(params)
    params, state = step(params, state)
    with test_utils.log_compilations() as compilation_logs:
        _ = step(params, state)
    assert not compilation_logs, "Optimizer recompiles on second call to 'update'."


@pytest.mark.parametrize(
    "name,target",
    [
        # optax's product for galore (rank 8): 1-D leaves are plain Adam; a 2x2 leaf
        # whose rank would reach min(m, n) goes to plain Adam by our default labels.
        ("galore_adamw", _setup_parabola),
        ("galore_adamw", _setup_rosenbrock),
        ("galore_adamw", _setup_matrix_parabola),
        ("galore_adamw", _setup_mixed_tensor_target),
        # Ours: the same problem with every treatment actually low-rank.
        ("galore_adamw_r1", _setup_mixed_nd_target),  # Adam, GaLore and Tucker leaves
        ("scale_by_galore", _setup_mixed_nd_target),  # the 3-D leaf flattened
        ("galore_adamw_clipped", _setup_mixed_nd_target),
    ],
)
def test_optimizers(name, target):
    tx = _FACTORIES[name]()
    initial_params, final_params, obj_fn = target(jnp.float32)

    def step(params, state):
        updates, state = tx.update(jax.grad(obj_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(initial_params)

    @jax.jit
    def run(params, state):
        return jax.lax.scan(lambda c, _: (step(*c), None), (params, state), length=30_000)[0]

    params, state = run(initial_params, state)
    # optax skips galore off CPU (SVD accuracy); ours refreshes in float32 everywhere.
    test_utils.assert_trees_all_close(params, final_params, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", sorted(_FACTORIES))
@pytest.mark.parametrize("target", [_setup_mixed_tensor_target, _setup_mixed_nd_target])
def test_tree_map_params(name, target):
    """optax's subtest of test_optimizers, apart so that it does not hide convergence:
    a no-op map_params runs init on a leafless placeholder and must find the same
    state structure as init on the params."""
    tx, _, _ = _opt(name)
    initial_params, _, _ = target(jnp.float32)
    state = tx.init(initial_params)
    mapped = optax.tree.map_params(tx, lambda v: v, state)
    test_utils.assert_trees_all_equal(mapped, state)


def _inject_hint(factory, hparams, params):
    """The static_args that the error of an un-static inject_hyperparams names."""
    with pytest.raises(TypeError) as info:
        optax.inject_hyperparams(factory)(**hparams).init(params)
    match = re.search(r"static_args=(\([^)]*\))", str(info.value))
    assert match, f"no static_args=(...) hint in: {info.value}"
    return ast.literal_eval(match.group(1))


@pytest.mark.parametrize(
    "factory,hparams,needed",
    [
        # = _FACTORIES["galore_adamw_r1"] and ["tensor_galore_adamw"]; rank 1 fits (2, 3).
        (
            gj.galore_adamw,
            {"learning_rate": 1e-2, "rank": 1, "svd": "exact"},
            ("rank", "update_proj_gap"),
        ),
        (
            gj.tensor_galore_adamw,
            {"learning_rate": 1e-2, "rank": 0.5},
            ("rank", "update_proj_gap"),
        ),
        # optax's rank 8 is clipped to (2, 3)'s 2; we don't clip.
        (
            gj.scale_by_galore,
            {"rank": 2, "svd": "exact"},
            ("rank", "update_proj_gap"),
        ),
    ],
)
def test_optimizers_can_be_wrapped_in_inject_hyperparams(factory, hparams, needed):
    """optax passes static_args=('rank', 'update_proj_gap'); so do we (option objects
    are static by themselves), and the error message says so: following it must work."""
    params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
    static_args = _inject_hint(factory, hparams, params)
    assert set(needed) <= set(static_args) <= set(gj.GALORE_ADAMW_STATIC_ARGS), static_args

    opt_inject = optax.inject_hyperparams(factory, static_args=static_args)(**hparams)
    if factory is gj.scale_by_galore:  # the hint works; the comparison is the aliases' (compiles)
        jax.eval_shape(opt_inject.update, grads, jax.eval_shape(opt_inject.init, params), params)
        return

    tx, _, update = _opt("galore_adamw_r1" if factory is gj.galore_adamw else "tensor_galore_adamw")
    updates, new_state = update(grads, tx.init(params), params)
    state_inject = jax.jit(opt_inject.init)(params)
    inject_update = jax.jit(opt_inject.update)
    updates_inject, new_state_inject = inject_update(grads, state_inject, params)

    test_utils.assert_trees_all_close(updates_inject, updates, rtol=1e-5)
    test_utils.assert_trees_all_close(new_state_inject.inner_state, new_state, rtol=1e-5, atol=1e-5)

    if "learning_rate" in hparams:
        # Ours: the injected learning rate is live; doubling it doubles the update.
        hyper = dict(state_inject.hyperparams)
        hyper["learning_rate"] = 2 * hyper["learning_rate"]
        doubled, _ = inject_update(grads, state_inject._replace(hyperparams=hyper), params)
        test_utils.assert_trees_all_close(
            doubled, jax.tree.map(lambda u: 2 * u, updates), rtol=1e-5
        )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserve_dtype(dtype):
    """Updates have the params' dtype (optax: a (2,) vector; ours: every treatment)."""
    params = _nd_params(jnp.dtype(dtype))
    _, init, update = _opt("galore_adamw_r1")
    updates, new_state = update(_grads(params), init(params), params)
    for key in params:
        assert updates[key].dtype == params[key].dtype, key
    # Ours: the state keeps its dtypes across an update (no promotion).
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
        lambda x: x.dtype, init(params)
    )


def test_preserve_dtype_of_mixed_dtype_params():
    """Ours: a tree whose leaves have different dtypes keeps each leaf's dtype."""
    params = _nd_params()
    params = {
        "v": params["v"].astype(jnp.bfloat16),
        "w": params["w"],
        "t": params["t"].astype(jnp.float16),
    }
    _, init, update = _opt("tensor_galore_adamw")
    updates, _ = update(_grads(params), init(params), params)
    for key in params:
        assert updates[key].dtype == params[key].dtype, key


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation(dtype):
    """optax.MultiSteps: the first k - 1 micro-steps give exactly zero updates.
    Ours too: the k-th applies the inner update of the mean gradient."""
    inner, init, update = _opt("galore_adamw_r1")
    tx = optax.MultiSteps(inner, every_k_schedule=4)
    params = _nd_params(jnp.dtype(dtype))
    if dtype == "bfloat16":
        params = _vw(params)
    micro = [
        jax.tree.map(
            lambda p, i=i: np.sin(np.asarray(p, np.float32) * (i + 1) + i).astype(p.dtype), params
        )
        for i in range(4)
    ]
    state = jax.jit(tx.init)(params)
    multi_update = jax.jit(tx.update)
    updates, state = multi_update(micro[0], state, params)
    test_utils.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, micro[0]))
    for g in micro[1:]:
        updates, state = multi_update(g, state, params)
    if dtype == "float32":
        mean = jax.tree.map(lambda *g: sum(g) / len(g), *micro)
        expected, _ = update(mean, init(params), params)
        test_utils.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_state_shape_dtype_shard_stability(dtype):
    """optax's check on the parabola (1-D), run on our 1-D + 2-D (+ 3-D) tree: updates
    and the new state must have the types of params and state (lax.cond agrees)."""
    with optax_utils.x64_precision(dtype == jnp.float64):
        tx = _FACTORIES["galore_adamw_r1"]()
        initial_params = _nd_params(dtype)
        if dtype != jnp.float16:
            initial_params = _vw(initial_params)  # Tucker's (widened) dtypes: checked in float16

        @jax.jit
        def step(params, state):
            updates = jax.grad(lambda p: _sum_sq(p))(params)
            # defeat compiler optimization, use lax.cond to check for stability
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                cond, lambda: tx.update(updates, state, params), lambda: (params, state)
            )
            return optax.apply_updates(params, updates), state

        params, state = initial_params, tx.init(initial_params)
        for _ in range(2):
            params, new_state = step(params, state)
            assert all(x.dtype == dtype for x in jax.tree.leaves(params))
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            state = jax.lax.cond(cond, lambda: state, lambda: new_state)  # noqa: B023


def test_learning_rate_annotation_accepts_schedules():
    """optax only runs the schedule test when learning_rate is annotated as taking a
    Schedule; ours are postponed annotations, so resolve them before checking."""
    for factory in (gj.galore_adamw, gj.tensor_galore_adamw):
        hint = typing.get_type_hints(factory)["learning_rate"]
        assert optax.Schedule in typing.get_args(hint), hint


def test_optimizers_accept_learning_rate_schedule():
    params0 = _vw(_nd_params())
    objective = lambda p: _sum_sq(jax.tree.map(lambda x: x - 1.0, p))
    with_schedule = gj.galore_adamw(
        learning_rate=optax.constant_schedule(1e-3), rank=1, svd="exact"
    )
    with_lr = gj.galore_adamw(learning_rate=1e-3, rank=1, svd="exact")

    def run(tx):
        # 10 steps in one compile (optax runs them eagerly; ours is slow eagerly: a
        # lax.switch per leaf).
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(objective)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), length=10)[0][0])(params0)

    test_utils.assert_trees_all_close(run(with_schedule), run(with_lr))


# ---- ours, in the spirit of the common tests ----


def test_eager_update_equals_jitted():
    """optax's _galore_test.py calls update un-jitted; it must match the jitted one."""
    tx = gj.scale_by_galore(rank=1, update_proj_gap=1, svd="exact")
    params = {"w": _nd_params()["w"]}
    grads = jax.tree.map(jnp.sin, params)
    state = tx.init(params)
    test_utils.assert_trees_all_close(
        tx.update(grads, state, params), jax.jit(tx.update)(grads, state, params), rtol=1e-6
    )


def test_state_structure_kept_and_counts_increment():
    _, init, update = _opt("galore_adamw_r1")
    params = _nd_params()
    grads = _grads(params)
    state0 = state = init(params)
    for _ in range(3):
        updates, state = update(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state0
    )
    counts = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if any(getattr(k, "name", None) == "count" for k in path)
    ]
    assert len(counts) >= 4  # adam, galore (+ its adam), tensor_galore (+ its adam)
    assert all(int(c) == 3 for c in counts), counts


def test_zero_gradients_give_finite_updates():
    _, init, update = _opt("galore_adamw_r1")
    params = _nd_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = update(zeros, init(params), params)
    test_utils.assert_tree_all_finite(updates)


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_empty_params_tree(name):
    tx, _, _ = _opt(name)
    for empty in ({}, (), [], None):
        state = tx.init(empty)
        updates, _ = tx.update(empty, state, empty)
        assert jax.tree.structure(updates) == jax.tree.structure(empty)


def test_weight_decay_mask():
    """optax.contrib.galore's `mask` is our weight_decay_mask: masked-out leaves get
    no decay, the others get -lr * wd * p on top of the undecayed update."""
    _, init, update = _opt("tensor_galore_adamw")  # the same chain as galore_adamw's
    params = _vw(_nd_params())
    mask = {"v": False, "w": True}
    tx = gj.tensor_galore_adamw(
        learning_rate=1e-2, rank=0.5, weight_decay=0.1, weight_decay_mask=mask
    )
    grads = _grads(params)
    decayed, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    plain, _ = update(grads, init(params), params)
    expected = {k: plain[k] - (1e-2 * 0.1 * params[k] if mask[k] else 0) for k in params}
    test_utils.assert_trees_all_close(decayed, expected, rtol=1e-5, atol=1e-8)


# ============================================================================
# _galore_test.py
# ============================================================================


def _galore_state(tx, params):
    return jax.eval_shape(tx.init, params)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (64, 64)])
def test_left_vs_right_projection_state_shapes(shape):
    """optax keeps the smaller moments (left U (m, r) when m >= n, else right).
    Ours: proj_type="std" is galore-torch's choice, the opposite (right when m >= n,
    square included); "reverse_std" is optax's choice."""
    m, n = shape
    rank = 8
    params = jnp.zeros(shape)
    std = _galore_state(gj.scale_by_galore(rank, update_proj_gap=10), params)
    rev = _galore_state(
        gj.scale_by_galore(rank, update_proj_gap=10, proj_type="reverse_std"), params
    )
    if m >= n:  # std: right, Vh (r, n), moments (m, r); reverse_std: left, U (m, r), (r, n)
        assert _shapes_for(std.projectors) == [(rank, n)]
        assert std.base_state.mu.shape == std.base_state.nu.shape == (m, rank)
        assert _shapes_for(rev.projectors) == [(m, rank)]
        assert rev.base_state.mu.shape == rev.base_state.nu.shape == (rank, n)
    else:  # std: left; reverse_std: right (optax's)
        assert _shapes_for(std.projectors) == [(m, rank)]
        assert std.base_state.mu.shape == std.base_state.nu.shape == (rank, n)
        assert _shapes_for(rev.projectors) == [(rank, n)]
        assert rev.base_state.mu.shape == rev.base_state.nu.shape == (m, rank)


def test_rank_is_not_clipped_to_min_dimension():
    """optax clips rank=999 on a (10, 3) matrix to 3. Ours refuses to run a forced
    GaLore leaf at a rank it cannot have."""
    with pytest.raises(ValueError, match="rank"):
        gj.scale_by_galore(rank=999, update_proj_gap=10).init(jnp.zeros((10, 3)))


def test_memory_reduction_vs_full_moments():
    dim, rank = 256, 8
    state = _galore_state(gj.scale_by_galore(rank=rank), jnp.zeros((dim, dim)))
    assert state.base_state.mu.size == rank * dim
    assert state.base_state.nu.size == rank * dim
    assert state.base_state.mu.size < dim * dim


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_projector_orthonormality_after_update(svd):
    m, n, r = 16, 32, 4
    params = {"w": jnp.asarray(_normal(0, (m, n)))}
    tx = gj.scale_by_galore(rank=r, update_proj_gap=1, svd=svd)
    grads = {"w": jnp.asarray(_normal(1, (m, n)))}
    _, state2 = jax.jit(tx.update)(grads, tx.init(params), params)
    (p,) = _arrays_for(state2.projectors, "w")  # m < n, std: left U (m, r)
    assert p.shape == (m, r)
    gram = p.T @ p
    assert jnp.allclose(gram, jnp.eye(r, dtype=gram.dtype), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("gap,changes", [(1000, False), (1, True)])
def test_projector_update_gap_behavior(gap, changes):
    params = jnp.ones((32, 64), dtype=jnp.float32)
    tx = gj.scale_by_galore(rank=8, update_proj_gap=gap, svd="exact")
    update = jax.jit(tx.update)
    grads0 = jnp.arange(params.size, dtype=jnp.float32).reshape(params.shape)
    _, s1 = update(grads0, tx.init(params), params)
    _, s2 = update(jnp.flip(grads0, axis=0), s1, params)
    (p0,), (p1,) = _arrays_for(s1.projectors), _arrays_for(s2.projectors)
    assert bool(jnp.allclose(p0, p1)) != changes


def test_converges_on_simple_quadratic_2d():
    w = jnp.ones((64, 64))
    tx = gj.galore_adamw(learning_rate=0.1, rank=8, update_proj_gap=1, svd="exact")
    state = tx.init(w)
    assert _arrays_for(_inner(state, "galore").projectors)  # the root matrix is low-rank

    @jax.jit
    def step(p, s):
        u, ns = tx.update(p, s, p)
        return optax.apply_updates(p, u), ns

    init_norm = jnp.linalg.norm(w)
    for _ in range(20):
        w, state = step(w, state)
    assert jnp.linalg.norm(w) < init_norm


def _assert_energy_decreases(tx, params, state, steps=10):
    """optax's energy test: the gradient of sum(p**2) / 2 is p; 10 steps lower the energy."""

    @jax.jit
    def step(p, s):
        u, ns = tx.update(p, s, p)
        return optax.apply_updates(p, u), ns

    e0 = _sum_sq(params)
    for _ in range(steps):
        params, state = step(params, state)
    assert _sum_sq(params) < e0


def test_optimization_decreases_total_energy_for_pytree():
    params = {"W1": jnp.ones((32, 64)), "W2": jnp.ones((64, 16)), "b": jnp.ones((16,))}
    tx = gj.galore_adamw(learning_rate=0.05, rank=8, update_proj_gap=2, svd="exact")
    state = tx.init(params)
    assert _arrays_for(_inner(state, "galore").projectors, "W1")
    assert _arrays_for(_inner(state, "galore").projectors, "W2")

    _assert_energy_decreases(tx, params, state)


def test_mixed_pytree_shapes_jittable_regression():
    params = {
        "W": jnp.ones((16, 32), dtype=jnp.bfloat16),
        "b": jnp.ones((32,), dtype=jnp.bfloat16),
        "conv": jnp.ones((3, 3, 8), dtype=jnp.bfloat16),
    }
    # Ours: mu_dtype is galore_adamw's own argument; "conv" (3-D) gets Tensor-GaLore.
    tx = gj.galore_adamw(
        learning_rate=0.01, rank=4, update_proj_gap=5, mu_dtype=jnp.float32, svd="exact"
    )
    state = tx.init(params)
    assert _arrays_for(_inner(state, "tensor_galore").factors, "conv")

    @jax.jit
    def step(p, s):
        u, ns = tx.update(p, s, p)
        return optax.apply_updates(p, u), ns

    new_params, new_state = step(params, state)
    assert new_params["W"].shape == (16, 32)
    assert new_params["b"].shape == (32,)
    assert new_params["conv"].shape == (3, 3, 8)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new_params))
    assert _inner(new_state, "galore").base_state.mu["W"].dtype == jnp.float32


def test_mu_dtype_controls_moment_dtype():
    params = jnp.ones((16, 32), dtype=jnp.bfloat16)
    tx = gj.scale_by_galore(
        rank=4,
        update_proj_gap=1,
        svd="exact",
        base_optimizer=optax.scale_by_adam(mu_dtype=jnp.float32),
    )
    state = tx.init(params)
    assert state.base_state.mu.dtype == jnp.float32
    assert state.base_state.nu.dtype == jnp.bfloat16  # scale_by_adam: nu in the params' dtype
    updates, _ = jax.jit(tx.update)(jnp.ones_like(params), state, params)
    assert updates.dtype == jnp.bfloat16


# ---- Non-2-D leaves. optax reshapes a leaf to a matrix with
# GaLoreDimensionNumbers(reduction_axis, output_axis). Our DimensionNumbers name
# batch axes (stacked layers, independent projectors) instead; a leaf with a
# `None` entry in a dimension_numbers pytree has none and is flattened to
# (d0, prod(rest)) - optax's reduction_axis=0, output_axis=(1, 2). (Without
# dimension_numbers a single (512, 8, 64) leaf reads as 512 stacked 8x64
# layers.) Through galore_adamw a 3-D leaf gets Tensor-GaLore unless labelled
# "galore".

_FLAT = None  # a dimension_numbers entry: no batch axes


def test_3d_attention_weights_flattened():
    embed_dim, num_heads, head_dim = 512, 8, 64
    params = {"attn": jnp.ones((embed_dim, num_heads, head_dim))}
    tx = gj.scale_by_galore(rank=16, dimension_numbers={"attn": _FLAT})
    state = _galore_state(tx, params)
    grads = {"attn": jnp.ones((embed_dim, num_heads, head_dim)) * 0.1}
    updates, _ = jax.eval_shape(tx.update, grads, state, params)
    assert updates["attn"].shape == (embed_dim, num_heads, head_dim)
    # (512, 512): std projects on the right (galore-torch), Vh (16, 512); optax: U (512, 16).
    assert _shapes_for(state.projectors, "attn") == [(16, num_heads * head_dim)]


def test_3d_memory_reduction_flattened():
    embed_dim, num_heads, head_dim = 256, 8, 64
    rank = 16
    params = {"w": jnp.zeros((embed_dim, num_heads, head_dim))}
    dims = {"w": _FLAT}
    state = _galore_state(gj.scale_by_galore(rank=rank, dimension_numbers=dims), params)
    # (256, 512), m < n: std projects on the left, moments (r, n); optax (m, r).
    assert state.base_state.mu["w"].shape == (rank, num_heads * head_dim)
    assert state.base_state.nu["w"].shape == (rank, num_heads * head_dim)
    assert state.base_state.mu["w"].size < embed_dim * num_heads * head_dim
    rev = _galore_state(
        gj.scale_by_galore(rank=rank, proj_type="reverse_std", dimension_numbers=dims), params
    )
    assert rev.base_state.mu["w"].shape == (embed_dim, rank)  # optax's shape


@pytest.mark.parametrize(
    "make,label",
    [
        # flattened (64, 64) matrix GaLore
        (
            lambda: gj.galore_adamw(
                learning_rate=0.1,
                rank=8,
                update_proj_gap=1,
                svd="exact",
                label_overrides={"attn": "galore"},
                dimension_numbers={"attn": _FLAT},
            ),
            "galore",
        ),
        # Tucker; optax's rank 8 does not fit the size-4 mode. Forced: a lone (64, 4, 16)
        # leaf reads as 64 stacked layers, which tensor_galore_adamw gives plain Adam.
        (
            lambda: gj.tensor_galore_adamw(
                learning_rate=0.1,
                rank=0.5,
                update_proj_gap=1,
                label_overrides={"attn": "tensor_galore"},
            ),
            "tensor_galore",
        ),
    ],
    ids=["galore", "tensor_galore"],
)
def test_3d_convergence(make, label):
    params = {"attn": jnp.ones((64, 4, 16))}
    tx = make()
    state = tx.init(params)
    inner = _inner(state, label)
    assert _arrays_for(inner.projectors if label == "galore" else inner.factors, "attn")

    _assert_energy_decreases(tx, params, state)


def test_mixed_2d_and_3d_params():
    params = {"attn": jnp.ones((128, 4, 32)), "mlp": jnp.ones((128, 256)), "bias": jnp.ones((256,))}
    dims = {"attn": _FLAT, "mlp": None, "bias": None}  # a pytree of defaults
    tx = gj.galore_adamw(learning_rate=0.01, rank=8, dimension_numbers=dims)
    state = jax.eval_shape(tx.init, params)
    grads = jax.tree.map(lambda x: x * 0.1, params)
    updates, _ = jax.eval_shape(tx.update, grads, state, params)
    assert updates["attn"].shape == (128, 4, 32)
    assert updates["mlp"].shape == (128, 256)
    assert updates["bias"].shape == (256,)
    assert _arrays_for(_inner(state, "galore").projectors, "mlp")
    assert _arrays_for(_inner(state, "tensor_galore").factors, "attn")
    assert _inner(state, "adam").mu["bias"].shape == (256,)


def test_right_projection_flattened():
    params = {"w": jnp.ones((32, 8, 64))}  # flattened to (32, 512)
    dims = {"w": _FLAT}
    rank = 8
    # optax (smaller moments): right, projector (512, 8), moments (32, 8) = our reverse_std.
    rev = _galore_state(
        gj.scale_by_galore(rank=rank, proj_type="reverse_std", dimension_numbers=dims), params
    )
    assert _shapes_for(rev.projectors, "w") == [(rank, 512)]
    assert rev.base_state.mu["w"].shape == (32, rank)
    std = _galore_state(gj.scale_by_galore(rank=rank, dimension_numbers=dims), params)
    assert _shapes_for(std.projectors, "w") == [(32, rank)]  # galore-torch: left
    assert std.base_state.mu["w"].shape == (rank, 512)


def test_single_dimension_number_applied_to_all():
    params = {"w1": jnp.ones((64, 4, 16)), "w2": jnp.ones((32, 8, 8)), "bias": jnp.ones((64,))}
    grads = jax.tree.map(lambda x: x * 0.1, params)
    same_shapes = lambda u: jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
    # Every >= 2-D leaf flattened to (d0, rest); the 1-D bias skipped.
    tx = gj.scale_by_galore(rank=8, dimension_numbers={"w1": _FLAT, "w2": _FLAT, "bias": None})
    state = _galore_state(tx, params)
    updates, _ = jax.eval_shape(tx.update, grads, state, params)
    assert same_shapes(updates)
    assert _shapes_for(state.projectors, "w1") == [(8, 64)]  # (64, 64): right
    assert _shapes_for(state.projectors, "w2") == [(32, 8)]  # (32, 64): left
    assert not _arrays_for(state.projectors, "bias")
    # One DimensionNumbers for all leaves it fits: axis 1 is a batch of matrices.
    tx = gj.scale_by_galore(rank=4, dimension_numbers=gj.DimensionNumbers(batch_axes=(1,)))
    state = _galore_state(tx, params)
    updates, _ = jax.eval_shape(tx.update, grads, state, params)
    assert same_shapes(updates)
    # (64, 16) per batch element: right, Vh (4, 4, 16); (32, 8): right, Vh (8, 4, 8).
    assert _shapes_for(state.projectors, "w1") == [(4, 4, 16)]
    assert _shapes_for(state.projectors, "w2") == [(8, 4, 8)]
    assert not _arrays_for(state.projectors, "bias")


# ============================================================================
# Contract items of the issue (ours).
# ============================================================================


def test_inject_hyperparams_hint_is_enough_with_option_objects():
    """The hint that the first error gives must be enough: after following it no
    further TypeError, with the Tucker rank (a float) held by an option object."""
    params = {"w": jnp.ones((4, 3)), "t": jnp.ones((3, 4, 2))}
    hparams = {"learning_rate": 1e-2, "rank": 1, "tensor": gj.Tucker(rank=0.5)}
    static_args = _inject_hint(gj.galore_adamw, hparams, params)
    assert set(static_args) <= set(gj.GALORE_ADAMW_STATIC_ARGS)
    tx = optax.inject_hyperparams(gj.galore_adamw, static_args=static_args)(**hparams)
    state = jax.eval_shape(tx.init, params)
    assert state.hyperparams["learning_rate"].shape == ()


@pytest.mark.parametrize(
    "make",
    [
        lambda gap: gj.galore_adamw(1e-2, rank=1, update_proj_gap=gap),
        lambda gap: gj.tensor_galore_adamw(1e-2, rank=0.5, update_proj_gap=gap),
        lambda gap: gj.scale_by_galore(1, update_proj_gap=gap),
        lambda gap: gj.scale_by_tensor_galore(0.5, update_proj_gap=gap),
    ],
    ids=["galore_adamw", "tensor_galore_adamw", "scale_by_galore", "scale_by_tensor_galore"],
)
def test_update_proj_gap_must_fit_int32(make):
    make(2**31 - 1)  # the largest int32 is fine
    with pytest.raises(ValueError, match="update_proj_gap"):
        make(2**31)


@pytest.mark.parametrize(
    "make",
    [
        lambda base: gj.scale_by_galore(4, base_optimizer=base),
        lambda base: gj.scale_by_tensor_galore(0.5, base_optimizer=base),
    ],
    ids=["scale_by_galore", "scale_by_tensor_galore"],
)
def test_base_optimizer_needing_params_is_refused(make):
    """optax only warns in its docstring (adamw crashes or silently misbehaves)."""
    with pytest.raises((ValueError, TypeError), match=r"(?i)param"):
        make(optax.adamw(1e-3))
    make(optax.scale_by_adam())  # params-free base optimizers are fine
    make(optax.sgd(1.0))


@pytest.mark.parametrize("factory", [gj.galore_adamw, gj.tensor_galore_adamw])
def test_arguments_after_learning_rate_are_keyword_only(factory):
    """galore_adamw(8, 1e-2) (torch's rank-first order) must not mean lr=8, rank=0.01."""
    with pytest.raises(TypeError):
        factory(8, 1e-2)
    parameters = list(inspect.signature(factory).parameters.values())
    assert parameters[0].name == "learning_rate"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[1:])


@pytest.mark.parametrize(
    "factory,kwargs",
    [(gj.galore_adamw, {"rank": 1, "svd": "exact"}), (gj.tensor_galore_adamw, {"rank": 0.5})],
)
def test_update_without_params_when_no_weight_decay(factory, kwargs):
    params = _nd_params() if factory is gj.tensor_galore_adamw else _vw(_nd_params())
    grads = _grads(params)
    tx = factory(learning_rate=1e-2, weight_decay=0.0, **kwargs)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params))
    test_utils.assert_tree_all_finite(updates)
    tx = factory(learning_rate=1e-2, weight_decay=0.1, **kwargs)
    # A clear error: it says that weight_decay needs params.
    with pytest.raises(ValueError, match=r"(?i)(?=.*params)(?=.*weight_decay)"):
        jax.eval_shape(tx.update, grads, tx.init(params))


def _near_rank_one(shape, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape[0])
    for d in shape[1:]:
        g = np.multiply.outer(g, rng.standard_normal(d))
    return g + 1e-3 * rng.standard_normal(shape)


def test_float16_tensor_galore_updates_are_finite():
    """Gradients near low rank have tiny core entries; squared in float16 Adam's nu
    underflows and eps=1e-8 is 0 in float16 (plain optax.adam is fine on these)."""
    shapes = {
        "matrix": (8, 6),  # a matrix forced to Tucker
        "t3d": (4, 6, 4),
    }  # a 3-D leaf (leading 4 is a feature size: not a stack)
    params = {k: jnp.asarray(_normal(0, s), jnp.float16) for k, s in shapes.items()}
    tx = gj.tensor_galore_adamw(
        1e-2, rank=0.5, update_proj_gap=2, label_overrides={"matrix": "tensor_galore"}
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for k in shapes:  # Tucker, not plain Adam
        assert _arrays_for(_inner(state, "tensor_galore").factors, k), k
    for t in range(4):
        grads = {k: jnp.asarray(_near_rank_one(s, t), jnp.float16) for k, s in shapes.items()}
        updates, state = update(grads, state, params)
        for k in shapes:
            assert updates[k].dtype == jnp.float16
            assert bool(jnp.all(jnp.isfinite(updates[k]))), f"{k} leaf, step {t}: non-finite update"


@pytest.mark.parametrize("rank", [999, 3])
def test_default_labels_send_full_rank_leaves_to_adam(rank):
    """optax clips rank to min(m, n); our default labels send a leaf whose rank would
    reach min(m, n) to plain Adam (GaLore at full rank only costs SVDs)."""
    params = {"w": jnp.cos(jnp.arange(30.0)).reshape(10, 3), "v": jnp.ones(3)}
    tx = gj.galore_adamw(learning_rate=1e-2, rank=rank)
    state = jax.eval_shape(tx.init, params)
    assert _inner(state, "adam").mu["w"].shape == (10, 3)
    assert not _arrays_for(_inner(state, "galore").projectors)
    grads = jax.tree.map(jnp.sin, params)
    ours, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    ref_tx = optax.adam(1e-2)
    ref, _ = jax.jit(ref_tx.update)(grads, ref_tx.init(params), params)
    test_utils.assert_trees_all_close(ours, ref, rtol=1e-6)


def test_forced_galore_leaf_keeps_the_rank_error():
    params = {"w": jnp.zeros((10, 3))}
    with pytest.raises(ValueError, match="rank"):
        gj.galore_adamw(learning_rate=1e-2, rank=999, label_overrides={"w": "galore"}).init(params)


# ---- Trajectories against optax.contrib.galore ----
# Equivalent settings: svd="exact" (optax: jnp.linalg.svd in float32),
# proj_type="reverse_std" (optax keeps the smaller moments: left when m >= n,
# square included; our "std" is galore-torch's opposite side, so with "std" only
# the 1-D leaves would coincide), the same scale (optax's default is 1.0, ours
# 0.25), refreshes at count % gap == 0 in both, Adam's defaults, decoupled decay
# after, 1-D leaves in plain unscaled Adam in both.
# One thing differs: we flip every basis vector to a canonical sign, optax keeps
# LAPACK's. Adam's first moment is kept across refreshes, so a sign that flips
# between two refreshes changes optax's trajectory (seen here at the 2nd
# refresh): with b1 > 0 they coincide until the first refresh after step 0;
# with b1 = 0 (Adam's moments then sign-free) over every refresh.

_CMP_STEPS, _CMP_GAP = 16, 4


def _cmp_problem():
    shapes = {"a": (12, 8), "b": (8, 12), "c": (8, 8), "bias": (8,)}
    params = {k: jnp.asarray(_normal(i, s)) for i, (k, s) in enumerate(shapes.items())}
    target = {k: jnp.asarray(_normal(10 + i, s)) for i, (k, s) in enumerate(shapes.items())}

    def loss(p):
        return sum(
            jnp.sum(
                jnp.square(p[k] - target[k])
                * (1 + jnp.arange(p[k].size).reshape(p[k].shape) / p[k].size)
            )
            for k in p
        )

    return params, jax.jit(jax.grad(loss))


def _trajectory(tx, params, grad_fn):
    state = tx.init(params)
    update = jax.jit(tx.update)
    traj, states = [], []
    for _ in range(_CMP_STEPS):
        updates, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        traj.append(params)
        states.append(state)
    return traj, states


def _ours(b1, proj_type="reverse_std"):
    return gj.galore_adamw(
        learning_rate=0.1,
        rank=3,
        b1=b1,
        svd="exact",
        proj_type=proj_type,
        scale=0.5,
        update_proj_gap=_CMP_GAP,
        weight_decay=0.1,
    )


def _optax(b1):
    return optax.contrib.galore(
        learning_rate=0.1,
        rank=3,
        scale=0.5,
        update_proj_gap=_CMP_GAP,
        weight_decay=0.1,
        base_optimizer=optax.scale_by_adam(b1=b1),
    )


def test_matches_optax_galore_over_refreshes_without_momentum():
    params, grad_fn = _cmp_problem()
    ours, ours_states = _trajectory(_ours(b1=0.0), params, grad_fn)
    ref, ref_states = _trajectory(_optax(b1=0.0), params, grad_fn)
    for t in range(_CMP_STEPS):
        test_utils.assert_trees_all_close(
            ours[t], ref[t], rtol=1e-4, atol=1e-4, err_msg=f"step {t}"
        )
        # Same subspaces up to sign: optax stores U (m, r) or V (n, r); we store U or Vh.
        for k in ("a", "b", "c"):
            (p,) = _arrays_for(_inner(ours_states[t], "galore").projectors, k)
            q = ref_states[t][0].projector[k]
            p = p if p.shape == q.shape else p.T
            np.testing.assert_allclose(jnp.abs(p.T @ q), np.eye(3), atol=1e-4, err_msg=f"{t} {k}")


def test_matches_optax_galore_until_first_refresh_with_momentum():
    params, grad_fn = _cmp_problem()
    ours, _ = _trajectory(_ours(b1=0.9), params, grad_fn)
    ref, _ = _trajectory(_optax(b1=0.9), params, grad_fn)
    for t in range(_CMP_GAP):
        test_utils.assert_trees_all_close(
            ours[t], ref[t], rtol=1e-4, atol=1e-5, err_msg=f"step {t}"
        )
    for t in range(_CMP_STEPS):  # 1-D leaves: plain Adam in both, all along
        np.testing.assert_allclose(ours[t]["bias"], ref[t]["bias"], rtol=1e-5, atol=1e-6)
    # "std" (galore-torch's side) projects every matrix on the other side.
    mu = _inner(jax.eval_shape(_ours(b1=0.9, proj_type="std").init, params), "galore").base_state.mu
    assert mu["a"].shape == (12, 3) and mu["b"].shape == (3, 12) and mu["c"].shape == (8, 3)

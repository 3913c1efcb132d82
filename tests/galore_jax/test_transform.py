"""scale_by_galore / scale_by_tensor_galore: schedule, moments, composability, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj


def _grad_stream(params, steps, seed=0):
    key = jax.random.PRNGKey(seed)
    return [
        jax.tree.map(
            lambda p, i=i: jax.random.normal(
                jax.random.fold_in(key, i), p.shape, jnp.float32
            ).astype(p.dtype),
            params,
        )
        for i in range(steps)
    ]


def _per_leaf(slot_trees):
    """{param: [its projector arrays]} from the state's per-slot trees."""
    out = {}
    for tree in slot_trees:
        for k, x in tree.items():
            out.setdefault(k, [])
            if not (isinstance(x, tuple) and not x):
                out[k].append(x)
    return out


def _refresh_steps(tx, params, steps, get_projectors):
    state = tx.init(params)
    update = jax.jit(tx.update)
    changed = {k: [] for k in params}
    for t, g in enumerate(_grad_stream(params, steps)):
        before = jax.tree.map(np.asarray, _per_leaf(get_projectors(state)))
        _, state = update(g, state, params)
        after = _per_leaf(get_projectors(state))
        for k in params:
            if any(not np.array_equal(b, np.asarray(a)) for b, a in zip(before[k], after[k])):
                changed[k].append(t)
    return changed


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_refresh_at_every_gap(svd):
    params = {"a": jnp.zeros((12, 8)), "b": jnp.zeros((8, 12))}
    tx = gj.scale_by_galore(rank=3, update_proj_gap=3, svd=svd)
    changed = _refresh_steps(tx, params, 10, lambda s: s.projectors)
    assert changed == {"a": [0, 3, 6, 9], "b": [0, 3, 6, 9]}


def test_stagger_spreads_refreshes():
    params = {
        "a": jnp.zeros((12, 8)),
        "b": jnp.zeros((12, 8)),
        "c": jnp.zeros((12, 8)),
        "bias": jnp.zeros((8,)),
    }
    tx = gj.scale_by_galore(rank=3, update_proj_gap=6, stagger=True)
    changed = _refresh_steps(tx, params, 17, lambda s: s.projectors)
    # offsets 0, 2, 4 inside the gap; everyone starts from the first gradient.
    assert changed["a"] == [0, 6, 12]
    assert changed["b"] == [0, 8, 14]
    assert changed["c"] == [0, 10, 16]
    assert changed["bias"] == []


def test_tensor_galore_refreshes_its_factors():
    params = {"w": jnp.zeros((6, 5, 4, 4), jnp.complex64)}
    tx = gj.scale_by_tensor_galore(rank=0.5, update_proj_gap=4)
    grads = [
        {"w": (g["w"] + 1j * g["w"][::-1]).astype(jnp.complex64)}
        for g in _grad_stream({"w": jnp.zeros((6, 5, 4, 4))}, 9)
    ]
    state = tx.init(params)
    changed = []
    for t, g in enumerate(grads):
        before = [np.asarray(f["w"]) for f in state.factors]
        updates, state = jax.jit(tx.update)(g, state)
        after = [f["w"] for f in state.factors]
        if any(not np.array_equal(b, np.asarray(a)) for b, a in zip(before, after)):
            changed.append(t)
    assert changed == [0, 4, 8]
    assert updates["w"].dtype == jnp.complex64
    # Adam's second moment of complex leaves tracks |g|^2 (real, non-negative).
    nu = np.asarray(state.base_state.nu["w"])
    assert np.all(np.abs(nu.imag) < 1e-6) and np.all(nu.real >= 0)


def _np(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "project"])
def test_moments_follow_on_refresh(on_refresh):
    """At a refresh the first moment is b1 * M + (1 - b1) * R, where M is the old
    moment kept, zeroed, or rotated by U_new^T U_old, and R the new projection."""
    b1 = 0.9
    params = {"w": jnp.zeros((10, 16))}  # m < n: std projects on the left, moments r x n
    tx = gj.scale_by_galore(
        rank=3,
        update_proj_gap=2,
        svd="exact",
        on_refresh=on_refresh,
        base_optimizer=optax.scale_by_adam(b1=b1),
    )
    state = tx.init(params)
    grads = _grad_stream(params, 3, seed=1)
    for g in grads[:2]:
        _, state = tx.update(g, state)
    u_old, mu_old, nu_old = (
        _np(state.projectors.left["w"]),
        _np(state.base_state.mu["w"]),
        _np(state.base_state.nu["w"]),
    )
    _, state = tx.update(grads[2], state)  # count 2: refresh
    u_new = _np(state.projectors.left["w"])
    assert not np.allclose(u_new, u_old)
    low = u_new.T @ _np(grads[2]["w"])
    rotation = u_new.T @ u_old
    carried = {"keep": mu_old, "reset": 0 * mu_old, "project": rotation @ mu_old}[on_refresh]
    np.testing.assert_allclose(
        _np(state.base_state.mu["w"]), b1 * carried + (1 - b1) * low, atol=1e-5
    )
    nu_carried = {"keep": nu_old, "reset": 0 * nu_old, "project": rotation**2 @ nu_old}[on_refresh]
    np.testing.assert_allclose(
        _np(state.base_state.nu["w"]), 0.999 * nu_carried + 0.001 * low**2, atol=1e-6
    )


def test_agrees_with_optax_contrib_galore():
    """Same rule where they coincide: reverse_std (optax projects the larger side),
    exact SVD, scale 1, no refresh after the first (optax fixes no signs)."""
    params = {"tall": jnp.zeros((24, 10)), "wide": jnp.zeros((10, 24)), "b": jnp.zeros((10,))}
    ours = gj.scale_by_galore(
        rank=4, update_proj_gap=100, scale=1.0, proj_type="reverse_std", svd="exact"
    )
    theirs = optax.contrib.scale_by_galore(rank=4, update_proj_gap=100, scale=1.0)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for g in _grad_stream(params, 5, seed=2):
        u_ours, s_ours = ours.update(g, s_ours)
        u_theirs, s_theirs = theirs.update(g, s_theirs)
        for k in params:
            np.testing.assert_allclose(
                np.asarray(u_ours[k]), np.asarray(u_theirs[k]), rtol=1e-4, atol=1e-5
            )


def _train(tx, params, steps, seed=0):
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for g in _grad_stream(params, steps, seed):
        params, state = step(params, state, g)
    return params, state


def test_composes_with_clip_multisteps_and_inject_hyperparams():
    params = {"w": jnp.ones((12, 8)) * 0.1, "b": jnp.zeros((8,))}
    galore = lambda: gj.scale_by_galore(
        rank=3, update_proj_gap=4, svd=gj.RandomizedSVD(oversample=4)
    )
    chained = optax.chain(optax.clip_by_global_norm(1.0), galore(), optax.scale(-1e-2))
    p_chain, _ = _train(chained, params, 6)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p_chain))

    multi = optax.MultiSteps(optax.chain(galore(), optax.scale(-1e-2)), every_k_schedule=2)
    p_multi, s_multi = _train(multi, params, 6)
    assert int(s_multi.inner_opt_state[0].count) == 3  # 6 micro-steps -> 3 updates

    injected = optax.inject_hyperparams(
        gj.scale_by_galore,
        static_args=gj.GALORE_ADAMW_STATIC_ARGS,
    )(rank=3, update_proj_gap=4, scale=0.25, svd=gj.RandomizedSVD(oversample=4))
    p_inj, s_inj = _train(optax.chain(injected, optax.scale(-1e-2)), params, 6)
    p_ref, _ = _train(optax.chain(galore(), optax.scale(-1e-2)), params, 6)
    np.testing.assert_allclose(np.asarray(p_inj["w"]), np.asarray(p_ref["w"]), rtol=1e-6)
    assert float(s_inj[0].hyperparams["scale"]) == 0.25


def test_inject_hyperparams_without_static_rank_is_a_clear_error():
    tx = optax.inject_hyperparams(gj.scale_by_galore)(rank=3)
    with pytest.raises(TypeError, match="static_args"):
        tx.init({"w": jnp.zeros((8, 4))})


def test_bf16_params_keep_dtype():
    params = {"w": jnp.ones((16, 8), jnp.bfloat16), "b": jnp.zeros((8,), jnp.bfloat16)}
    out, state = _train(gj.galore_adamw(1e-2, rank=4, update_proj_gap=3), params, 4)
    assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.bfloat16
    projector = state[0].inner_states["galore"].inner_state.projectors.right["w"]
    assert projector.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "proj_type", ["std", "reverse_std", pytest.param("full", marks=pytest.mark.slow)]
)
def test_bf16_params_project_back_with_a_bf16_gemm(proj_type):
    """bf16 params: the projection back is a bf16 x bf16 GEMM writing the bf16 update
    (no float32 full-size array then converted), and the update is the float32
    computation's rounded to bf16 (within a few bf16 ulps)."""
    shapes = {"tall": (3, 64, 40), "wide": (40, 72)}  # stacked left side, 2-D right side
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(shapes))
    params = {n: jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys)}
    grads = {n: jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys[2:])}
    dims = {"tall": gj.DimensionNumbers((0,)), "wide": None}
    bf16 = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)  # noqa: E731
    tx = gj.scale_by_galore(8, update_proj_gap=5, proj_type=proj_type, dimension_numbers=dims)
    _, state = jax.jit(tx.update)(bf16(grads), tx.init(bf16(params)))  # refresh at step 0
    # The reference: the same state (bf16 bases, widened) and bf16 gradients, in float32.
    widen = lambda t: jax.tree.map(  # noqa: E731
        lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, t
    )
    got, _ = jax.jit(tx.update)(bf16(grads), state)  # a step between refreshes
    want, _ = jax.jit(tx.update)(widen(bf16(grads)), widen(state))
    for name in shapes:
        assert got[name].dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(want[name])))
        np.testing.assert_allclose(
            np.asarray(got[name], np.float32), want[name], rtol=2**-6, atol=2**-7 * scale
        )
    lowered = jax.jit(tx.update).lower(bf16(grads), state).as_text()
    full_size = [
        line
        for line in lowered.splitlines()
        if "dot_general" in line and re.search(r"-> tensor<(3x64x40|40x72)x", line)
    ]
    assert full_size and all(re.search(r"-> tensor<\S+xbf16>", line) for line in full_size)
    assert all("xf32>" not in line.split("->")[0].split(":")[-1] for line in full_size)


def test_stacked_layers_equal_independent_matrices():
    layers = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 8))
    stacked = {"w": layers}
    separate = {f"w{i}": layers[i] for i in range(3)}
    make = lambda dims: optax.chain(
        gj.scale_by_galore(rank=3, update_proj_gap=2, svd="exact", dimension_numbers=dims),
        optax.scale(-0.1),
    )
    tx_stacked = make(gj.DimensionNumbers(batch_axes=(0,)))
    tx_separate = make(None)
    s1, s2 = tx_stacked.init(stacked), tx_separate.init(separate)
    for t in range(5):
        g = jax.random.normal(jax.random.PRNGKey(10 + t), (3, 12, 8))
        u1, s1 = tx_stacked.update({"w": g}, s1)
        u2, s2 = tx_separate.update({f"w{i}": g[i] for i in range(3)}, s2)
        for i in range(3):
            np.testing.assert_allclose(np.asarray(u1["w"][i]), np.asarray(u2[f"w{i}"]), atol=1e-6)
    assert s1[0].projectors.right["w"].shape == (3, 3, 8)


def test_galore_adamw_labels_and_overrides():
    params = {
        "embed": jnp.zeros((32, 8)),
        "attn": {"q": jnp.zeros((8, 8))},
        "norm": jnp.ones((8,)),
        "stack": jnp.zeros((2, 8, 8)),
        "conv": jnp.zeros((4, 4, 3)),
    }
    dims = {
        "embed": None,
        "attn": {"q": None},
        "norm": None,
        "stack": gj.DimensionNumbers((0,)),
        "conv": None,
    }
    labels = gj.galore_labels(params, dimension_numbers=dims)
    assert labels == {
        "embed": "adam",
        "attn": {"q": "galore"},
        "norm": "adam",
        "stack": "galore",
        "conv": "tensor_galore",
    }
    labels = gj.galore_labels(params, label_overrides={"attn/q": "adam", "^embed": "galore"})
    assert labels["attn"]["q"] == "adam" and labels["embed"] == "galore"
    tx = gj.galore_adamw(1e-3, rank=4, dimension_numbers=dims, tensor_rank=0.5)
    out, _ = _train(tx, params, 2)
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, params)


def test_learning_rate_schedule_in_alias():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    params = {"w": jnp.ones((12, 8))}
    out, _ = _train(gj.galore_adamw(schedule, rank=3, update_proj_gap=5), params, 3)
    assert np.isfinite(np.asarray(out["w"])).all()


# ----------------------------------------------------------------------------
# Bad input: clear errors at construction or init.
# ----------------------------------------------------------------------------

BAD_ARGS = [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-3), ValueError, "rank"),
    (dict(rank=1.5), ValueError, "rank"),
    (dict(rank="8"), TypeError, "rank"),
    (dict(proj_type="diagonal"), ValueError, "proj_type"),
    (dict(svd="lanczos"), ValueError, "svd"),
    (dict(on_refresh="rotate"), ValueError, "on_refresh"),
    (dict(update_proj_gap=0), ValueError, "update_proj_gap"),
    (dict(update_proj_gap=2.5), TypeError, "update_proj_gap"),
    (dict(power_iters=-1), ValueError, "power_iters"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD_ARGS)
def test_bad_arguments_raise_at_construction(kwargs, error, name):
    with pytest.raises(error, match=name):
        gj.scale_by_galore(**kwargs)


def test_bad_leaves_raise_at_init():
    with pytest.raises(ValueError, match=r"rank=64.*'w'"):
        gj.scale_by_galore(rank=64).init({"w": jnp.zeros((32, 16))})
    with pytest.raises(TypeError, match="'steps'.*int32"):
        gj.scale_by_galore(rank=2).init(
            {"w": jnp.zeros((8, 4)), "steps": jnp.zeros((3,), jnp.int32)}
        )
    with pytest.raises(ValueError, match="dimension_numbers"):
        gj.scale_by_galore(rank=2, dimension_numbers={"other": None}).init({"w": jnp.zeros((8, 4))})
    with pytest.raises(ValueError, match="dimension_numbers.*'w'"):
        gj.scale_by_galore(rank=2, dimension_numbers={"w": gj.DimensionNumbers((0, 1))}).init(
            {"w": jnp.zeros((2, 8, 4))}
        )
    with pytest.raises(ValueError, match="has 2 entries"):
        gj.scale_by_tensor_galore(rank=(2, 2)).init({"w": jnp.zeros((4, 4, 4))})
    with pytest.raises(ValueError, match="mode 2"):
        gj.scale_by_tensor_galore(rank=(2, 2, 9)).init({"w": jnp.zeros((4, 4, 4))})


def test_rank_fraction_resolves_per_leaf():
    state = gj.scale_by_galore(rank=0.25).init({"w": jnp.zeros((64, 32)), "v": jnp.zeros((16, 40))})
    assert state.projectors.right["w"].shape == (8, 32)  # right side: 0.25 * 32
    assert state.projectors.left["v"].shape == (16, 4)  # left side: 0.25 * 16


# ----------------------------------------------------------------------------
# Memory accounting.
# ----------------------------------------------------------------------------


def test_memory_report_matches_analytic_count_for_llama_like_tree():
    hidden, inter, layers, vocab, r = 64, 172, 2, 256, 16
    params = {
        "embed": jnp.zeros((vocab, hidden)),
        "lm_head": jnp.zeros((hidden, vocab)),
        "final_norm": jnp.zeros((hidden,)),
        "layers": {
            "q": jnp.zeros((layers, hidden, hidden)),
            "k": jnp.zeros((layers, hidden, hidden)),
            "gate": jnp.zeros((layers, hidden, inter)),
            "down": jnp.zeros((layers, inter, hidden)),
            "norm": jnp.zeros((layers, hidden)),
        },
    }
    dims = jax.tree.map(lambda p: gj.DimensionNumbers((0,)) if p.ndim == 3 else None, params)
    state = gj.galore_adamw(1e-3, rank=r, dimension_numbers=dims).init(params)
    report = gj.memory_report(state, params)
    f32 = 4

    # std: m >= n projects on the right (Vh r x n, moments m x r),
    # else on the left (U m x r, moments r x n)
    def galore_bytes(m, n):
        if m >= n:
            return (r * n + 2 * m * r) * f32
        return (m * r + 2 * r * n) * f32

    galore = layers * (
        2 * galore_bytes(hidden, hidden) + galore_bytes(hidden, inter) + galore_bytes(inter, hidden)
    )
    adam = 2 * f32 * (2 * vocab * hidden + hidden + layers * hidden)
    # + GaLore's int32 count, its uint32[2] PRNG key, its int32 skipped-refresh count and
    # the inner Adam's int32 count
    assert report["per_label"]["galore"] == galore + 4 + 8 + 4 + 4
    assert report["per_label"]["adam"] == adam + 4
    assert report["total_bytes"] == sum(report["per_label"].values())
    assert report["total_bytes"] == gj.memory.optimizer_state_bytes(state)
    assert report["adamw_bytes"] == 2 * f32 * sum(p.size for p in jax.tree.leaves(params)) + 4
    assert report["ratio_to_adamw"] < 0.6

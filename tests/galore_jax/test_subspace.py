"""Gradients accumulated in the subspace equal the full-size path (gj.accumulate_in_subspace).

Compared in float64: Adam normalises each coordinate, so float32 rounding (a different
summation order is enough) grows to ~1e-3 over ten steps on either path; in float64
the two paths agree to ~1e-12, which no real difference could.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj

STEPS, ACCUM = 7, 4  # gap 3: refreshes at steps 0, 3 and 6


def _params(dtype, tensor=False):
    """Two matrices, a bias and (`tensor`) a 3-D leaf gj.galore_adamw Tucker-projects."""
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w1": (jax.random.normal(ks[0], (24, 40)) * 0.2).astype(dtype),
        "w2": (jax.random.normal(ks[1], (40, 12)) * 0.2).astype(dtype),
        "b": jnp.zeros((40,), dtype),
    }
    if tensor:
        params["stack"] = (jax.random.normal(ks[2], (3, 12, 12)) * 0.3).astype(dtype)
    return params


def loss_fn(p, batch):
    x, y = batch
    out = jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"]
    for layer in range(3 if "stack" in p else 0):
        out = jnp.tanh(out @ p["stack"][layer])
    return jnp.mean((out - y) ** 2)


def _batches(dtype, accum=ACCUM, steps=STEPS, poison=None):
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    xs = jax.random.normal(ks[0], (steps, accum, 8, 24)).astype(dtype)
    ys = jax.random.normal(ks[1], (steps, accum, 8, 12)).astype(dtype)
    for where in poison or ():  # (step, micro-batch): a NaN input there
        xs = xs.at[where].set(jnp.nan)
    return xs, ys


def _full_size_step(tx):
    def step(params, state, batch):
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)
        grads = jax.tree.map(lambda g: jnp.mean(g, 0), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, jnp.mean(losses)

    return jax.jit(step)


def _subspace_step(tx, stage=None, refresh_parts=1):
    accumulate = gj.accumulate_in_subspace(loss_fn, stage or tx, refresh_parts=refresh_parts)

    def step(params, state, batch):
        loss, grads, subspace = accumulate(params, batch, state)
        updates, state = tx.update(grads, state, params, subspace=subspace)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step)


def _train(step, tx, params, xs, ys):
    state, losses = tx.init(params), []
    for t in range(xs.shape[0]):
        params, state, loss = step(params, state, (xs[t], ys[t]))
        losses.append(float(loss))
    return params, state, losses


def _assert_same_training(
    tx,
    *,
    stage=None,
    accum=ACCUM,
    poison=None,
    steps=STEPS,
    tensor=False,
    rtol=1e-9,
    refresh_parts=1,
):
    with jax.enable_x64(True):
        params = _params(jnp.float64, tensor)
        xs, ys = _batches(jnp.float64, accum, steps, poison=poison)
        pa, sa, la = _train(_full_size_step(tx), tx, params, xs, ys)
        step = _subspace_step(tx, stage, refresh_parts)
        pb, sb, lb = _train(step, tx, params, xs, ys)
    np.testing.assert_allclose(lb, la, rtol=rtol)
    for name in pa:
        scale = float(jnp.max(jnp.abs(pa[name])))
        assert float(jnp.max(jnp.abs(pa[name] - pb[name]))) <= rtol * scale, name
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):  # projectors, moments, counts
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(b, a, atol=1e3 * rtol * float(jnp.max(jnp.abs(a))))
        else:
            np.testing.assert_array_equal(b, a)
    return sa, sb


def test_galore_adamw_equals_the_full_size_path_over_three_refreshes():
    # The Tucker-projected tensor is summed at full size beside the matrices. (One
    # micro-batch: the data-parallel test below.)
    tx = gj.galore_adamw(3e-2, rank=4, update_proj_gap=3, weight_decay=0.1)
    _assert_same_training(tx, tensor=True)


def test_a_plain_optax_chain_around_a_staggered_low_bit_scale_by_galore():
    # The user's own chain. reverse_std, staggered refreshes (some steps refresh one
    # leaf), moments rotated into the new basis, int8 projectors, two power iterations
    # and a cold start; the refresh in two parts (one matrix each: a step where one
    # matrix is due runs one part's passes).
    stage = gj.scale_by_galore(
        rank=4,
        update_proj_gap=3,
        proj_type="reverse_std",
        stagger=True,
        on_refresh="project",
        projector=gj.ProjectorStorage(bits=8),
        svd=gj.RandomizedSVD(power_iters=2, warm_start=False),
    )
    tx = optax.chain(stage, optax.scale(-1e-2))
    _assert_same_training(tx, stage=stage, refresh_parts=2)


def test_non_finite_micro_batches_count_as_the_full_size_path_counts_them():
    # Step 2 (steady): that step's low-rank gradients count as zero. Step 3 (a
    # refresh): it is skipped for both matrices and the old bases kept. The refresh
    # runs in two parts: each counts its skips.
    tx = gj.galore_adamw(3e-2, rank=4, update_proj_gap=3)
    sa, sb = _assert_same_training(tx, poison=[(2, 1), (3, 0)], steps=5, refresh_parts=2)
    galore_a, galore_b = (s[0].inner_states["galore"].inner_state for s in (sa, sb))
    assert int(galore_a.skipped_refreshes) == int(galore_b.skipped_refreshes) == 2


def test_fira_accumulates_at_full_size():
    # Fira's update reads the raw gradient: its leaves are summed at full size and its
    # own update refreshes them (nothing is given to it).
    tx = gj.fira_adamw(3e-2, rank=4, update_proj_gap=3)
    params = _params(jnp.float32)
    xs, ys = _batches(jnp.float32, steps=1)
    batch = (xs[0], ys[0])
    _, grads, subspace = jax.jit(gj.accumulate_in_subspace(loss_fn, tx))(
        params, batch, tx.init(params)
    )
    _, mean = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)
    assert subspace.entries == {}
    for name in params:
        np.testing.assert_allclose(grads[name], jnp.mean(mean[name], 0), rtol=2e-5, atol=1e-7)


def test_refusals_name_the_fix():
    exact = gj.galore_adamw(1e-2, rank=4, svd="exact")
    params = _params(jnp.float32)
    xs, ys = _batches(jnp.float32, steps=1)
    with pytest.raises(ValueError, match="svd='randomized'"):
        gj.accumulate_in_subspace(loss_fn, exact)(params, (xs[0], ys[0]), exact.init(params))
    with pytest.raises(ValueError, match="no galore_jax low-rank transform"):
        gj.accumulate_in_subspace(loss_fn, optax.adamw(1e-3))
    with pytest.raises(ValueError, match="refresh_parts must be an int >= 1, got 0"):
        gj.accumulate_in_subspace(loss_fn, exact, refresh_parts=0)


def _shard_mapped_step(tx, mesh):
    """Each data-parallel replica takes its rows; they average low-rank sums."""
    accumulate = jax.shard_map(
        gj.accumulate_in_subspace(loss_fn, tx, axis_name="data"),
        mesh=mesh,
        in_specs=(jax.P(), jax.P(None, "data"), jax.P()),
        out_specs=jax.P(),
        axis_names={"data"},
    )

    def step(params, state, batch):
        loss, grads, subspace = accumulate(params, batch, state)
        _, mean = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)
        mean = jax.tree.map(lambda g: jnp.mean(g, 0), mean)  # the global mean gradient
        updates, state = tx.update(grads, state, params, subspace=subspace)
        return optax.apply_updates(params, updates), state, loss, (grads, mean)

    return jax.jit(step)


@pytest.mark.parametrize(
    "shape, accum",
    # data=2 x fsdp=4 also runs in tests/e2e/test_multiprocess.py (2 processes x 4).
    [((8, 1), 1), pytest.param((2, 4), 2, marks=pytest.mark.slow)],
)
def test_data_parallel_replicas_average_low_rank_gradients_exactly(shape, accum):
    """data=8 (one micro-batch each) and data=2 x fsdp=4 (two; the fsdp axis left to the
    partitioner) equal one device's full-size step over 3 refreshes; the gradient handed
    back is P P^H of the global mean (not of a replica's, nor of their sum)."""
    mesh = jax.make_mesh(shape, ("data", "fsdp"))
    tx = gj.galore_adamw(3e-2, rank=4, update_proj_gap=2)
    with jax.enable_x64(True):
        params, (xs, ys) = _params(jnp.float64), _batches(jnp.float64, accum=accum, steps=5)
        full, sharded = _full_size_step(tx), _shard_mapped_step(tx, mesh)
        pa, sa, pb, sb = params, tx.init(params), params, tx.init(params)
        for t in range(xs.shape[0]):
            batch = (xs[t], ys[t])
            pa, sa, la = full(pa, sa, batch)
            pb, sb, lb, (grads, mean) = sharded(pb, sb, batch)
            u = sb[0].inner_states["galore"].inner_state.projectors.left["w1"]  # (m, r)
            np.testing.assert_allclose(grads["w1"], u @ u.T @ mean["w1"], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(grads["b"], mean["b"], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(lb, la, rtol=1e-9)
    for name in pa:
        assert float(jnp.max(jnp.abs(pa[name] - pb[name]))) <= 1e-9 * float(
            jnp.max(jnp.abs(pa[name]))
        ), name

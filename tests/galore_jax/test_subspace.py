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

STEPS, ACCUM = 10, 4  # gap 3: refreshes at steps 0, 3, 6 and 9


def _params(dtype):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "w1": (jax.random.normal(ks[0], (24, 40)) * 0.2).astype(dtype),
        "w2": (jax.random.normal(ks[1], (40, 12)) * 0.2).astype(dtype),
        "stack": (jax.random.normal(ks[2], (3, 12, 12)) * 0.3).astype(dtype),
        "b": jnp.zeros((40,), dtype),
    }


def loss_fn(p, batch):
    x, y = batch
    out = jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"]
    for layer in range(3):
        out = jnp.tanh(out @ p["stack"][layer])
    return jnp.mean((out - y) ** 2)


def _batches(dtype, accum=ACCUM, steps=STEPS, poison=None):
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    xs = jax.random.normal(ks[0], (steps, accum, 8, 24)).astype(dtype)
    ys = jax.random.normal(ks[1], (steps, accum, 8, 12)).astype(dtype)
    if poison is not None:  # (step, micro-batch): a NaN input there
        xs = xs.at[poison].set(jnp.nan)
    return xs, ys


def _full_size_step(tx):
    def step(params, state, batch):
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)
        grads = jax.tree.map(lambda g: jnp.mean(g, 0), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, jnp.mean(losses)

    return jax.jit(step)


def _subspace_step(tx, stage=None):
    accumulate = gj.accumulate_in_subspace(loss_fn, stage or tx)

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


def _assert_same_training(tx, *, stage=None, accum=ACCUM, poison=None, rtol=1e-9):
    with jax.enable_x64(True):
        params, (xs, ys) = _params(jnp.float64), _batches(jnp.float64, accum, poison=poison)
        pa, sa, la = _train(_full_size_step(tx), tx, params, xs, ys)
        pb, sb, lb = _train(_subspace_step(tx, stage), tx, params, xs, ys)
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


@pytest.mark.parametrize("accum", [1, ACCUM])
def test_galore_adamw_equals_the_full_size_path_over_three_refreshes(accum):
    tx = gj.galore_adamw(3e-2, rank=4, update_proj_gap=3, weight_decay=0.1)
    _assert_same_training(tx, accum=accum)


def test_staggered_projected_low_bit_refreshes_equal_the_full_size_path():
    # reverse_std, staggered refreshes (some steps refresh one leaf), moments rotated
    # into the new basis, int8 projectors, two power iterations and a cold start.
    tx = gj.galore_adamw(
        3e-2,
        rank=4,
        update_proj_gap=3,
        proj_type="reverse_std",
        stagger=True,
        on_refresh="project",
        projector=gj.ProjectorStorage(bits=8),
        svd=gj.RandomizedSVD(power_iters=2, warm_start=False),
    )
    _assert_same_training(tx)


def test_a_plain_optax_chain_around_scale_by_galore():
    stage = gj.scale_by_galore(rank=3, update_proj_gap=3)  # stack: one 3 x 144 matrix
    tx = optax.chain(stage, optax.scale(-1e-2))
    _assert_same_training(tx, stage=stage)


@pytest.mark.parametrize("step", [2, 3])  # a steady step; a refresh step (skipped)
def test_a_non_finite_micro_batch_counts_as_the_full_size_path_counts_it(step):
    tx = gj.galore_adamw(3e-2, rank=4, update_proj_gap=3)
    sa, sb = _assert_same_training(tx, poison=(step, 1))
    galore_a, galore_b = (s[0].inner_states["galore"].inner_state for s in (sa, sb))
    expected = 2 if step == 3 else 0  # both matrices' refreshes
    assert int(galore_a.skipped_refreshes) == int(galore_b.skipped_refreshes) == expected


def test_fira_accumulates_at_full_size_and_still_matches():
    # Fira's update reads the raw gradient: its leaves are summed at full size.
    tx = gj.fira_adamw(3e-2, rank=4, update_proj_gap=3)
    _assert_same_training(tx)


def test_refusals_name_the_fix():
    exact = gj.galore_adamw(1e-2, rank=4, svd="exact")
    params = _params(jnp.float32)
    xs, ys = _batches(jnp.float32, steps=1)
    with pytest.raises(ValueError, match="svd='randomized'"):
        gj.accumulate_in_subspace(loss_fn, exact)(params, (xs[0], ys[0]), exact.init(params))
    with pytest.raises(ValueError, match="no galore_jax low-rank transform"):
        gj.accumulate_in_subspace(loss_fn, optax.adamw(1e-3))


def _shard_mapped_step(tx, mesh):
    """Each data-parallel replica takes its rows; they average low-rank sums."""
    from jax.sharding import PartitionSpec as P

    accumulate = jax.shard_map(
        gj.accumulate_in_subspace(loss_fn, tx, axis_name="data"),
        mesh=mesh,
        in_specs=(P(), P(None, "data"), P()),
        out_specs=P(),
        axis_names={"data"},
    )

    def step(params, state, batch):
        loss, grads, subspace = accumulate(params, batch, state)
        updates, state = tx.update(grads, state, params, subspace=subspace)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)])
def test_data_parallel_replicas_average_low_rank_gradients_exactly(shape):
    """data=8 and data=2 x fsdp=4 (the fsdp axis left to the partitioner) equal one
    device's full-size step; the gradient handed back is P P^H of the global mean."""
    mesh = jax.make_mesh(shape, ("data", "fsdp"))
    tx = gj.galore_adamw(3e-2, rank=4, update_proj_gap=3)
    with jax.enable_x64(True):
        params, (xs, ys) = _params(jnp.float64), _batches(jnp.float64, accum=2)
        pa, _, la = _train(_full_size_step(tx), tx, params, xs, ys)
        pb, _, lb = _train(_shard_mapped_step(tx, mesh), tx, params, xs, ys)
        state = tx.init(params)
        _, grads, _ = jax.jit(
            jax.shard_map(
                gj.accumulate_in_subspace(loss_fn, tx, axis_name="data"),
                mesh=mesh,
                in_specs=(jax.P(), jax.P(None, "data"), jax.P()),
                out_specs=jax.P(),
                axis_names={"data"},
            )
        )(params, (xs[0], ys[0]), state)
        _, mean = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, (xs[0], ys[0]))
        mean = jax.tree.map(lambda g: jnp.mean(g, 0), mean)
        _, state1 = tx.update(mean, state, params)  # the step-0 bases, from the mean
        u = state1[0].inner_states["galore"].inner_state.projectors.left["w1"]  # (m, r)
        expected = u @ u.T @ mean["w1"]
    np.testing.assert_allclose(grads["w1"], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads["b"], mean["b"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lb, la, rtol=1e-9)
    for name in pa:
        assert float(jnp.max(jnp.abs(pa[name] - pb[name]))) <= 1e-9 * float(
            jnp.max(jnp.abs(pa[name]))
        ), name

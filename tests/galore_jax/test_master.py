"""`gj.with_master_weights`: bf16 params that train like float32 ones.

The claim under test: with a float32 master copy, bf16 params follow the float32
trajectory (to bf16 rounding of each step's update), where plain bf16 params lose
every update below half an ulp; the params always equal the master rounded to
bf16; and the wrapper keeps the user's paths (nnx.Optimizer, layer-wise, 8-device
sharding, train.py with resume) working.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj

BF16 = jnp.bfloat16


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "proj": jax.random.normal(k[0], (48, 32)),  # GaLore
        "stack": jax.random.normal(k[1], (3, 24, 40)),  # stacked GaLore
        "gain": 1.0 + 0.1 * jax.random.normal(k[2], (32,)),  # Adam
    }


def _grads(step, params):
    """bf16-valued gradients (the same values reach the float32 and bf16 runs): a fixed
    direction plus noise, so the params drift ~lr a step."""
    leaves, treedef = jax.tree.flatten(params)
    fixed = jax.random.split(jax.random.PRNGKey(10), len(leaves))
    noise = jax.random.split(jax.random.PRNGKey(100 + step), len(leaves))
    out = [
        (jax.random.normal(k, x.shape) + 0.3 * jax.random.normal(n, x.shape)).astype(BF16)
        for k, n, x in zip(fixed, noise, leaves)
    ]
    return treedef.unflatten(out)


def _tx():
    dims = {"proj": None, "stack": gj.DimensionNumbers((0,)), "gain": None}
    # lr 1e-3 with Adam moves a param ~1e-3 a step: below half a bf16 ulp of |p| > 0.5.
    return gj.galore_adamw(
        1e-3, rank=6, update_proj_gap=4, weight_decay=0.1, dimension_numbers=dims
    )


def _train(tx, params, steps, cast):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        grads = jax.tree.map(cast, _grads(step, params))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.slow  # a convergence comparison
def test_bf16_params_with_master_follow_the_float32_run():
    start16 = jax.tree.map(lambda x: x.astype(BF16), _params())
    start = jax.tree.map(lambda x: x.astype(jnp.float32), start16)  # the same start
    steps = 12
    f32, _ = _train(_tx(), start, steps, lambda g: g.astype(jnp.float32))
    master_tx = gj.with_master_weights(_tx())
    with_master, state = _train(master_tx, start16, steps, lambda g: g)
    plain, _ = _train(_tx(), start16, steps, lambda g: g)
    assert isinstance(state, gj.master.MasterWeightsState)
    for name in start:
        ref = np.asarray(f32[name], np.float64)
        moved = np.abs(ref - np.asarray(start[name], np.float64)).max()
        master = np.asarray(state.master[name], np.float64)
        assert state.master[name].dtype == jnp.float32 and with_master[name].dtype == BF16
        # Each step's update is rounded to bf16 (the update dtype): a few 2^-9 of the path.
        master_err = np.abs(master - ref).max()
        assert master_err <= 2**-6 * moved, (name, master_err, moved)
        # The params are the master rounded to bf16, exactly.
        np.testing.assert_array_equal(with_master[name], state.master[name].astype(BF16))
        # ... so within one bf16 ulp (plus the master's own error) of the float32 run.
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)
        err = np.abs(np.asarray(with_master[name], np.float64) - ref)
        assert np.all(err <= ulp + 2**-6 * moved), name
    # Plain bf16 params lose every update below half an ulp: Adam's ~1e-3 steps on the
    # gains (|p| ~ 1, ulp 2^-7) never move them; the master's accumulate to an ulp or two.
    np.testing.assert_array_equal(plain["gain"], start16["gain"])
    moved_gains = np.asarray(with_master["gain"] != start16["gain"])
    assert moved_gains.mean() > 0.9, moved_gains.mean()


def test_extra_args_and_grad_scale_pass_through():
    params = jax.tree.map(lambda x: x.astype(BF16), _params())
    tx = gj.with_master_weights(_tx())
    assert isinstance(tx, gj.GradScaleTransformation)  # galore_adamw's grad_scale
    assert not isinstance(gj.with_master_weights(optax.adam(1e-3)), gj.GradScaleTransformation)
    state = tx.init(params)
    grads = _grads(0, params)
    scaled, _ = jax.jit(tx.update)(jax.tree.map(lambda g: 0.5 * g, grads), state, params)
    with_arg, _ = jax.jit(functools.partial(tx.update, grad_scale=0.5))(grads, state, params)
    for a, b in zip(jax.tree.leaves(with_arg), jax.tree.leaves(scaled)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)
    with pytest.raises(ValueError, match=r"with_master_weights needs the params"):
        tx.update(grads, state)


def test_layerwise_step_with_master_weights():
    def embed(p, batch):
        return jnp.tanh(batch["x"] @ p["w_in"].astype(jnp.float32))

    def layer(p, x):
        return x + jnp.tanh(x @ p["w"].astype(jnp.float32))

    def head(p, x, batch):
        return jnp.mean((x @ p["w_out"].astype(jnp.float32) - batch["y"]) ** 2)

    model = gj.ScannedModel(embed, layer, head, "trunk", before=("w_in",), after=("w_out",))
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w_in": jax.random.normal(k[0], (6, 16)) / 2,
        "trunk": {"w": jax.random.normal(k[1], (3, 16, 16)) / 4},
        "w_out": jax.random.normal(k[2], (16, 2)) / 4,
    }
    params = jax.tree.map(lambda x: x.astype(BF16), params)
    labels = gj.labels.labels_by_path(gj.galore_labels(params, rank=4))
    tx = gj.with_master_weights(gj.galore_adamw(1e-2, labels=labels, rank=4, update_proj_gap=3))
    state = gj.layerwise_init(tx, model, params)
    step = jax.jit(gj.layerwise_step(tx, model, max_norm=1.0, clip="layer"))
    batch = {"x": jnp.ones((8, 6)), "y": jnp.zeros((8, 2))}
    losses = []
    for _ in range(6):
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    master = state.layers.master["trunk"]["w"]
    assert master.dtype == jnp.float32 and master.shape == (3, 16, 16)
    np.testing.assert_array_equal(params["trunk"]["w"], master.astype(BF16))


def test_master_is_sharded_like_its_param_on_eight_devices():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    specs = {"proj": P("fsdp", None), "stack": P(None, "fsdp", None), "gain": P()}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(jax.tree.map(lambda x: x.astype(BF16), _params()), shardings)
    tx = gj.with_master_weights(_tx())
    abstract = jax.eval_shape(tx.init, params)
    state_shardings = gj.state_shardings(abstract, params, shardings)
    assert state_shardings.master["proj"].spec == P("fsdp", None)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    update = jax.jit(tx.update, out_shardings=(shardings, state_shardings))
    updates, state = update(_grads(0, params), state, params)
    assert state.master["stack"].sharding.spec == P(None, "fsdp", None)
    assert updates["proj"].dtype == jnp.float32  # the master's: p + u is exact

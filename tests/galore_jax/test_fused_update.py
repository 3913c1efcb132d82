"""The fused update of galore_adamw / tensor_galore_adamw: the clip factor, the
learning rate and GaLore's scale are applied in the low-rank space.

Reference: the same optimizer written as the plain optax chain it replaces,
clip_by_global_norm -> partition -> add_decayed_weights -> scale_by_learning_rate,
from optax's and our public transforms. The fused update must give the same
updates (to float32 rounding: the scalars multiply the small arrays instead of
the big ones), keep that chain's state tree, keep the non-finite semantics, and
touch each full-size leaf fewer times (counted in the compiled program).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax import labels as labels_lib
from galore_jax import paths

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import update_cost  # noqa: E402

MAX_NORM, WD, GAP = 0.5, 0.1, 4


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "attn": {"kernel": jax.random.normal(k[0], (3, 16, 12))},  # stacked: 3 projectors
        "conv": jax.random.normal(k[1], (6, 5, 4)),  # Tucker
        "proj": jax.random.normal(k[2], (40, 8)),  # GaLore
        "norm": jnp.ones(12),  # Adam
    }


DIMS = {
    "attn": {"kernel": gj.DimensionNumbers(batch_axes=(0,))},
    "conv": None,
    "proj": None,
    "norm": None,
}
NO_DECAY = {"attn": {"kernel": True}, "conv": True, "proj": True, "norm": False}


def _schedule():
    return optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20, 1e-3)


def _fused(moment_bits=None, learning_rate=None, max_grad_norm=MAX_NORM):
    return gj.galore_adamw(
        _schedule() if learning_rate is None else learning_rate,
        rank=4,
        tensor_rank=2,
        update_proj_gap=GAP,
        weight_decay=WD,
        weight_decay_mask=NO_DECAY,
        max_grad_norm=max_grad_norm,
        moment_bits=moment_bits,
        dimension_numbers=DIMS,
        seed=3,
    )


def _chain(moment_bits=None, learning_rate=None):
    """The unfused reference: every stage a separate optax transformation."""
    adam = gj.scale_by_adam_8bit if moment_bits == 8 else optax.scale_by_adam
    labels = lambda p: gj.galore_labels(p, rank=4, tensor_rank=2, dimension_numbers=DIMS)
    galore = gj.scale_by_galore(
        4, update_proj_gap=GAP, dimension_numbers=DIMS, seed=3, base_optimizer=adam()
    )
    tensor = gj.scale_by_tensor_galore(2, update_proj_gap=GAP, seed=4, base_optimizer=adam())
    return optax.chain(
        optax.clip_by_global_norm(MAX_NORM),
        optax.partition(
            {labels_lib.GALORE: galore, labels_lib.TENSOR_GALORE: tensor, labels_lib.ADAM: adam()},
            labels,
        ),
        optax.add_decayed_weights(WD, NO_DECAY),
        optax.scale_by_learning_rate(_schedule() if learning_rate is None else learning_rate),
    )


def _grads(step, params):
    big = 3.0 if step % 2 else 0.01  # odd steps are clipped, even ones are not
    keys = jax.random.split(jax.random.PRNGKey(100 + step), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([jax.random.normal(k, x.shape) * big for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("moment_bits,learning_rate", [(None, None), (8, 3e-3)])
def test_fused_update_equals_the_unfused_chain(moment_bits, learning_rate):
    params = _params()
    labels = gj.galore_labels(params, rank=4, tensor_rank=2, dimension_numbers=DIMS)
    assert set(jax.tree.leaves(labels)) == {
        "galore",
        "tensor_galore",
        "adam",
    }
    fused, chain = _fused(moment_bits, learning_rate), _chain(moment_bits, learning_rate)
    fused_state, chain_state = fused.init(params), chain.init(params)
    # The chain's state without the clip (which keeps none): old checkpoints fit.
    assert jax.tree.structure(fused_state) == jax.tree.structure(tuple(chain_state[1:]))
    fused_update, chain_update = jax.jit(fused.update), jax.jit(chain.update)
    p_fused = p_chain = params
    for step in range(3 * GAP + 1):  # three refreshes
        grads = _grads(step, params)
        u_fused, fused_state = fused_update(grads, fused_state, p_fused)
        u_chain, chain_state = chain_update(grads, chain_state, p_chain)
        for name, a, b in zip(
            paths.leaf_paths(u_fused)[0], jax.tree.leaves(u_fused), jax.tree.leaves(u_chain)
        ):
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(
                a, b, rtol=2e-5, atol=2e-5 * scale, err_msg=f"step {step}, {name}"
            )
        p_fused, p_chain = (
            optax.apply_updates(p_fused, u_fused),
            optax.apply_updates(p_chain, u_chain),
        )
    if learning_rate is None:  # the schedule's count lives where the chain keeps it
        assert int(fused_state[2].count) == int(chain_state[3].count) == 3 * GAP + 1


@pytest.mark.parametrize("factory", [gj.galore_adamw, gj.tensor_galore_adamw])
def test_grad_scale_extra_arg_is_a_scale_stage_before_the_clip(factory):
    """`update(g, ..., grad_scale=c)` is `update(c * g, ...)`: the clip sees the scaled
    norm. The factors cross MAX_NORM both ways (3.0-size gradients scaled below it,
    0.01-size ones above), and a negative factor flips the update."""
    params = _params()
    tx = factory(1e-2, rank=4, update_proj_gap=GAP, max_grad_norm=MAX_NORM, weight_decay=WD)
    assert isinstance(tx, gj.GradScaleTransformation)
    with_arg = jax.jit(lambda g, s, p, c: tx.update(g, s, p, grad_scale=c))
    scaled_first = jax.jit(lambda g, s, p, c: tx.update(jax.tree.map(lambda x: c * x, g), s, p))
    s1 = s2 = tx.init(params)
    p1 = p2 = params
    for step, c in enumerate([0.01, 30.0, -2.0, 1.0, 0.05, 500.0, 0.3, 1e-3, 7.0]):
        grads = _grads(step, params)
        u1, s1 = with_arg(grads, s1, p1, c)
        u2, s2 = scaled_first(grads, s2, p2, c)
        # Refreshes sketch the unscaled gradient (a subspace does not change with a
        # scalar), so the bases differ from the scaled gradient's by rounding, which the
        # small gaps between a random gradient's singular values amplify a little.
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


@pytest.mark.parametrize("bad", [np.nan, pytest.param(np.inf, marks=pytest.mark.slow)])
def test_non_finite_leaf_with_clipping_is_the_chain_with_that_leaf_zero(bad):
    """A NaN / inf in one leaf makes that leaf a zero gradient for the step; the clip's
    norm comes from the other leaves, which train on (and refresh) as if the bad leaf's
    gradient were zero. (optax's clip would scale every leaf to NaN.)"""
    params = _params()
    fused, chain = _fused(), _chain()
    fused_state, chain_state = fused.init(params), chain.init(params)
    fused_update, chain_update = jax.jit(fused.update), jax.jit(chain.update)
    for step in range(GAP + 2):
        grads = _grads(step, params)
        zeroed = dict(grads)
        if step == GAP:  # a refresh step; the bad value sits in the Adam-only leaf
            grads["norm"] = grads["norm"].at[3].set(bad)
            zeroed["norm"] = jnp.zeros_like(grads["norm"])
        u_fused, fused_state = fused_update(grads, fused_state, params)
        u_chain, chain_state = chain_update(zeroed, chain_state, params)
        for a, b in zip(jax.tree.leaves(u_fused), jax.tree.leaves(u_chain)):
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9)
        galore = fused_state[0].inner_states["galore"].inner_state
        assert int(galore.skipped_refreshes) == 0  # the GaLore leaves were finite


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_by_galore_extra_args_act_as_scale_stages(dtype):
    params = {"w": jnp.ones((16, 12), dtype), "v": jnp.ones((12,), dtype)}
    galore = lambda: gj.scale_by_galore(4, update_proj_gap=2, scale=0.3)  # noqa: E731
    chain = optax.chain(optax.scale(0.7), galore(), optax.scale(-2e-3))
    alone = galore()
    chain_state, alone_state = chain.init(params), alone.init(params)
    chain_update, alone_update = jax.jit(chain.update), jax.jit(alone.update)
    for step in range(5):
        grads = jax.tree.map(
            lambda x: jax.random.normal(jax.random.PRNGKey(step), x.shape, dtype), params
        )
        u_chain, chain_state = chain_update(grads, chain_state)
        u_alone, alone_state = alone_update(
            grads, alone_state, grad_scale=jnp.float32(0.7), update_scale=jnp.float32(-2e-3)
        )
        for name in params:
            assert u_alone[name].dtype == dtype
            tol = 1e-5 if dtype == jnp.float32 else 2e-2
            np.testing.assert_allclose(
                np.asarray(u_alone[name], np.float32),
                np.asarray(u_chain[name], np.float32),
                rtol=tol,
                atol=tol * float(jnp.max(jnp.abs(u_chain[name].astype(jnp.float32)))),
            )


@pytest.mark.parametrize("value,error", [(0, ValueError), (-1.0, ValueError), ("1", TypeError)])
@pytest.mark.parametrize("factory", [gj.galore_adamw, gj.tensor_galore_adamw])
def test_bad_max_grad_norm_is_refused_at_construction(factory, value, error):
    with pytest.raises(error, match=r"max_grad_norm must be"):
        factory(1e-3, max_grad_norm=value)


def test_fused_update_touches_each_full_size_leaf_fewer_times_than_the_chain():
    """XLA's compiled update: a pass = a top-level op reading or writing an array of a
    projected leaf's size. The chain clips, multiplies by scale and lr in full size;
    the fused update reads the gradient for the norm and the projection and writes the
    projected-back update, and without clipping only the last two."""
    params = {"layers": {"w": jnp.zeros((2, 96, 64)), "v": jnp.zeros((2, 64, 160))}}
    dims = {"layers": {"w": gj.DimensionNumbers((0,)), "v": gj.DimensionNumbers((0,))}}
    sizes = [2 * 96 * 64, 2 * 64 * 160]

    def passes(tx):
        abstract = jax.eval_shape(lambda: params)
        state = jax.eval_shape(tx.init, abstract)
        update = lambda g, s, p: tx.update(g, update_cost.with_constant_count(s, 1), p)  # noqa: E731
        hlo = jax.jit(update).lower(abstract, state, abstract).compile().as_text()
        return update_cost.full_size_passes(hlo, sizes)

    kw = dict(rank=8, update_proj_gap=10, dimension_numbers=dims)
    chained = passes(optax.chain(optax.clip_by_global_norm(1.0), gj.galore_adamw(1e-3, **kw)))
    fused = passes(gj.galore_adamw(1e-3, max_grad_norm=1.0, **kw))
    unclipped = passes(gj.galore_adamw(1e-3, **kw))
    assert fused <= 3 and unclipped <= 2, (fused, unclipped)
    assert fused < chained, (fused, chained)


def test_max_grad_norm_can_be_an_injected_hyperparameter():
    params = _params()
    direct = _fused(learning_rate=1e-2)
    injected = optax.inject_hyperparams(_fused, static_args=("moment_bits",))(
        learning_rate=1e-2, max_grad_norm=MAX_NORM
    )
    grads = _grads(1, params)  # clipped
    want, _ = jax.jit(direct.update)(grads, direct.init(params), params)
    state = injected.init(params)
    assert "max_grad_norm" in state.hyperparams
    got, _ = jax.jit(injected.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad", [jnp.ones(2), {"a": 1.0}, "0.5", True])
@pytest.mark.parametrize("factory", [gj.galore_adamw, gj.scale_by_galore])
def test_a_grad_scale_that_is_no_scalar_is_one_clear_error(factory, bad):
    params = {"w": jnp.ones((16, 8))}
    tx = factory(1e-3, rank=4) if factory is gj.galore_adamw else factory(4)
    with pytest.raises(ValueError, match=r"grad_scale must be a scalar \(a number or a 0-d"):
        tx.update(params, tx.init(params), params, grad_scale=bad)

"""Layer-wise updates over micro-batches (gj.layerwise_step(..., micro_batches=True)).

The claim: a layer-wise step that sums its micro-batches in GaLore's subspace trains as
the standard step on the full-size mean gradient does. In float64 (see test_subspace.py
for why), on a user's own scanned model with its own names, over three refreshes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scanned_user_model import DIMS, scanned_user_model

import galore_jax as gj

STEPS, ACCUM, LAYERS = 7, 4, 3  # gap 3: refreshes at steps 0, 3 and 6
OPTIONS = dict(rank=4, update_proj_gap=3, weight_decay=0.1)


def _model():
    model, _, loss = scanned_user_model(LAYERS)
    return model, loss


def _params():
    return scanned_user_model(LAYERS, jnp.float64)[1]


def _batches(steps=STEPS, poison=()):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(steps, ACCUM, 6, 12))
    for where in poison:  # (step, micro-batch): a NaN input there
        x[where] = np.nan
    y = rng.normal(size=(steps, ACCUM, 6, 3))
    return [{"x": jnp.asarray(x[t]), "y": jnp.asarray(y[t])} for t in range(steps)]


def _optimizers(params, overrides=None, **options):
    """(whole-tree tx, layer-wise tx): one projection rule; labels by path for the groups
    (one group alone, the encoder looks like a layer). `overrides`: label_overrides."""
    whole = gj.galore_adamw(
        3e-2, labels=gj.Labels(overrides=overrides, dimension_numbers=DIMS), **OPTIONS, **options
    )
    labels = gj.labels.labels_by_path(
        gj.galore_labels(
            params, dimension_numbers=DIMS, label_overrides=overrides, rank=OPTIONS["rank"]
        )
    )
    return whole, gj.galore_adamw(3e-2, labels=labels, **OPTIONS, **options)


def _full_size_step(tx, loss):
    @jax.jit
    def step(params, state, batches):
        losses, grads = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(params, batches)
        grads = jax.tree.map(lambda g: jnp.mean(g, 0), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, jnp.mean(losses)

    return step


def _assert_close(a, b, rtol=1e-9):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(float(jnp.max(jnp.abs(y))), 1e-30)
        assert float(jnp.max(jnp.abs(x - y))) <= rtol * scale


def _galore_state(state):
    return state.inner_states["galore"].inner_state


def _both_paths(batches, overrides=None, **step_options):
    """Yields (full-size step's (params, state, loss), layer-wise step's (params, state,
    metrics)) after each step, in float64."""
    model, loss = _model()
    params = _params()
    whole, tx = _optimizers(params, overrides)
    full = _full_size_step(whole, loss)
    step = jax.jit(gj.layerwise_step(tx, model, micro_batches=True, **step_options))
    a = params, whole.init(params), None
    b = params, gj.layerwise_init(tx, model, params), None
    for batch in batches:
        a, b = full(*a[:2], batch), step(*b[:2], batch)
        yield a, b


def test_layerwise_micro_batches_equal_the_full_size_mean_over_three_refreshes():
    # With NaN inputs in two micro-batches. Step 2 (steady): that step's low-rank
    # gradients count as zero. Step 3 (a refresh): skipped, the old bases kept, counted.
    # Refreshes at 0, 6 and 9.
    with jax.enable_x64(True):
        steps = list(_both_paths(_batches(steps=10, poison=[(2, 1), (3, 0)])))
    for (p1, _, l1), (p2, _, m) in steps:
        np.testing.assert_allclose(m["loss"], l1, rtol=1e-9)  # NaN where both are
        _assert_close(p2, p1)
    (p1, s1, _), (p2, s2, _) = steps[-1]
    for name in ("encoder", "readout"):  # not projected: the NaN step counted as zero
        assert bool(jnp.all(jnp.isfinite(p2[name])))
    # The same bases; the trunk's kernel is one stacked leaf of the whole tree, one leaf
    # per layer here, so each layer counts the whole tree's skip.
    whole, layer = _galore_state(s1[0]), _galore_state(s2.layers[0])
    _assert_close(
        layer.projectors.right["trunk"]["dense"]["kernel"],
        whole.projectors.right["trunk"]["dense"]["kernel"],
        rtol=1e-7,
    )
    assert int(whole.skipped_refreshes) == 1
    assert layer.skipped_refreshes.tolist() == [1] * LAYERS


def test_a_projected_embedding_refreshes_from_its_mean_gradient_after_the_passes():
    # The embedding's group (here the encoder, projected) is not summed beside the
    # layers': its mean gradient is formed after the layers' updates from each
    # micro-batch's embedding-output cotangent, and refreshed from it. Refreshes at 0,
    # 3 and 6; a NaN micro-batch at step 4.
    with jax.enable_x64(True):
        steps = list(_both_paths(_batches(poison=[(4, 2)]), overrides={"encoder": "galore"}))
    for (p1, _, l1), (p2, _, m) in steps:
        np.testing.assert_allclose(m["loss"], l1, rtol=1e-9)
        _assert_close(p2, p1)
    (_, s1, _), (_, s2, _) = steps[-1]
    whole, before = _galore_state(s1[0]), _galore_state(s2.before[0])
    assert before.projectors.left["encoder"].shape == (12, OPTIONS["rank"])
    _assert_close(before.projectors.left["encoder"], whole.projectors.left["encoder"], 1e-7)
    assert int(before.count) == STEPS


def test_previous_global_clip_reads_the_gradient_the_optimizer_sees():
    # The reference: the whole tree accumulated in the subspace, scaled by the factor
    # the previous step's norm of that gradient implies.
    model, loss = _model()
    max_norm = 0.05
    with jax.enable_x64(True):
        params = _params()
        whole, tx = _optimizers(params)
        accumulate = gj.accumulate_in_subspace(loss, whole)

        @jax.jit
        def reference(params, state, batches, previous_norm):
            value, grads, subspace = accumulate(params, batches, state)
            factor = jnp.where(previous_norm < max_norm, 1.0, max_norm / previous_norm)
            updates, state = whole.update(
                grads, state, params, subspace=subspace, grad_scale=factor
            )
            return optax.apply_updates(params, updates), state, value, optax.tree.norm(grads)

        step = jax.jit(
            gj.layerwise_step(
                tx, model, max_norm=max_norm, clip="previous_global", micro_batches=True
            )
        )
        p1, s1, norm = params, whole.init(params), jnp.zeros([], jnp.float64)
        p2, s2 = params, gj.layerwise_init(tx, model, params)
        for batches in _batches():
            p1, s1, l1, norm = reference(p1, s1, batches, norm)
            p2, s2, m = step(p2, s2, batches)
            np.testing.assert_allclose(m["grad_norm"], norm, rtol=1e-9)
            _assert_close(p2, p1)
        assert float(norm) > max_norm  # the clip acted


def test_micro_batches_refuse_what_cannot_accumulate_in_the_subspace():
    model, _ = _model()
    params = _params()
    with pytest.raises(ValueError, match="no galore_jax low-rank transform"):
        gj.layerwise_step(optax.adam(1e-3), model, micro_batches=True)
    labels = gj.labels.labels_by_path(gj.galore_labels(params, dimension_numbers=DIMS, rank=4))
    exact = gj.galore_adamw(1e-2, labels=labels, rank=4, svd=gj.ExactSVD())
    step = gj.layerwise_step(exact, model, micro_batches=True)
    state = gj.layerwise_init(exact, model, params)
    with pytest.raises(ValueError, match="exact"):
        jax.eval_shape(step, params, state, {"x": jnp.ones((2, 6, 12)), "y": jnp.ones((2, 6, 3))})

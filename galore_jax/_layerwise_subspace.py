"""The layer-wise step over micro-batches: gradients accumulate in GaLore's subspace.

A layer-wise step never holds the whole gradient tree, so it cannot sum micro-batches
at full size either. It sums them where GaLore's update reads them: per projected
matrix the low-rank `P^H G` (r x n per layer), every other leaf (norms, the embedding,
the head) at full size, as `galore_jax.subspace` does for the whole tree. Each pass
over the micro-batches runs the layer-wise backward (`scanned.backward_by_layer`) and
adds each group's terms as its gradient appears; a refresh step runs the refresh's
product passes first (the same stages as `accumulate_in_subspace`). The optimizer then
updates the groups one at a time from their sums (a scan over the layers), so one
layer's gradient in the subspace is expanded at a time.

Exact: the result is the full-size mean gradient's step, up to float rounding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from galore_jax.scanned import (
    ScannedModel,
    _groups,
    _put,
    _slice,
    _stack_size,
    _without_layer_axis,
    backward_by_layer,
)
from galore_jax.subspace import _Group, subspace_engines


def accumulating_step(tx, model: ScannedModel, apply: Callable) -> Callable:
    """The micro-batch step's work, un-jitted (`gj.layerwise_step` wraps it).

    Args:
      tx: the optimizer (a GaLore transformation with a randomized refresh).
      model: the model's `ScannedModel`.
      apply: ``(grads, opt_state, params, subspace, state) -> (params, opt_state,
        square)``, one group's update from its gradient in the subspace (``state``:
        the step's `LayerwiseState`; ``square``: the squared norm of ``grads``, for
        the step's ``grad_norm``).

    Returns:
      ``(params, state, batches) -> (before, layers, after, states, loss, square)``: each
      group's updated params and optimizer state, the mean loss and the squared global
      norm of the gradient the optimizer saw.
    """
    engines = subspace_engines(tx, "layerwise_step(micro_batches=True)")
    key = model.layers_key

    def step(params, state, batches):
        groups = _groups(model, params)
        before, layers, after = groups
        stack = layers[key]
        sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(batches)}
        if len(sizes) != 1:
            raise ValueError(
                f"layer-wise: micro_batches=True needs one leading micro-batch axis on every "
                f"batch leaf, got sizes {sorted(sizes)}"
            )
        (k,) = sizes
        # The mean loss in float32, or wider where the params are.
        loss_dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(params))

        g_before = _Group(engines, before, state.before)
        g_after = _Group(engines, after, state.after)

        def layer_group(params_i, state_i):
            return _Group(engines, {key: params_i}, state_i)

        def per_layer(method, *args):
            """`method` of every layer's group, vmapped over the stack (and `args`)."""
            return jax.vmap(lambda p, s, *a: method(layer_group(p, s), *a))(
                stack, state.layers, *args
            )

        # One schedule of product kinds for all groups (one tx, one refresh option set).
        probe = layer_group(_slice(stack, 0), _slice(state.layers, 0))
        with_refresh = [g for g in (g_before, probe, g_after) if g.refresh]
        kinds = {g.stage_kinds for g in with_refresh}
        assert len(kinds) <= 1, kinds

        def mean_over_micro_batches(terms_before, terms_layer, terms_after):
            """Each group's mean terms of its gradient, and the mean loss."""

            def zeros_like(shapes, stacked=0):
                lead = (stacked,) if stacked else ()
                return jax.tree.map(lambda s: jnp.zeros(lead + s.shape, s.dtype), shapes)

            one_layer = _without_layer_axis(stack)
            zeros = {
                "before": zeros_like(jax.eval_shape(terms_before, before)),
                "layers": zeros_like(
                    jax.eval_shape(lambda p, g: terms_layer(0, p, g), one_layer, one_layer),
                    _stack_size(layers),
                ),
                "after": zeros_like(jax.eval_shape(terms_after, after)),
            }
            add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731

            def one_micro_batch(total, batch):
                loss, total = backward_by_layer(
                    model,
                    groups,
                    batch,
                    total,
                    after=lambda g, c: {**c, "after": add(c["after"], terms_after(g))},
                    layer=lambda i, p, g, c: {
                        **c,
                        "layers": _put(
                            c["layers"], add(_slice(c["layers"], i), terms_layer(i, p, g)), i
                        ),
                    },
                    before=lambda g, c: {**c, "before": add(c["before"], terms_before(g))},
                    layer_params=lambda c, i: _slice(stack, i),
                )
                return {**total, "loss": total["loss"] + loss.astype(loss_dtype)}, None

            zeros["loss"] = jnp.zeros([], loss_dtype)
            total, _ = jax.lax.scan(one_micro_batch, zeros, batches)
            return jax.tree.map(lambda x: x / k, total)

        def layer_state(i):
            return _slice(state.layers, i)

        # -- the refresh's passes (a refresh step only) ---------------------------

        def run_stages(_):
            start = {
                "before": g_before.refresh_start(),
                "layers": per_layer(lambda g: g.refresh_start()),
                "after": g_after.refresh_start(),
            }
            stage_kinds = jnp.asarray(next(iter(kinds)), jnp.int32)

            def body(i, compact):
                kind = stage_kinds[i]
                sums = mean_over_micro_batches(
                    lambda g: g_before.refresh_terms(
                        g_before.treedef.flatten_up_to(g), compact["before"], kind
                    ),
                    lambda j, p, g: _flat_terms(
                        layer_group(p, layer_state(j)),
                        {key: g},
                        lambda grp, leaves: grp.refresh_terms(
                            leaves, _slice(compact["layers"], j), kind
                        ),
                    ),
                    lambda g: g_after.refresh_terms(
                        g_after.treedef.flatten_up_to(g), compact["after"], kind
                    ),
                )
                return {
                    "before": g_before.refresh_stage(i, compact["before"], sums["before"]),
                    "layers": per_layer(
                        lambda g, c, s: g.refresh_stage(i, c, s), compact["layers"], sums["layers"]
                    ),
                    "after": g_after.refresh_stage(i, compact["after"], sums["after"]),
                }

            compact = jax.lax.fori_loop(0, len(next(iter(kinds))), body, start)
            return {
                "before": g_before.refresh_finish(compact["before"]),
                "layers": per_layer(lambda g, c: g.refresh_finish(c), compact["layers"]),
                "after": g_after.refresh_finish(compact["after"]),
            }

        def keep(_):
            return {
                "before": g_before.refresh_keep(),
                "layers": per_layer(lambda g: g.refresh_keep()),
                "after": g_after.refresh_keep(),
            }

        refreshed = keep(None)
        if with_refresh:
            any_due = g_before.any_due | g_after.any_due | jnp.any(per_layer(lambda g: g.any_due))
            refreshed = jax.lax.cond(any_due, run_stages, keep, None)

        # -- the projection pass --------------------------------------------------

        sums = mean_over_micro_batches(
            lambda g: g_before.projection_terms(
                g_before.treedef.flatten_up_to(g), refreshed["before"]
            ),
            lambda j, p, g: _flat_terms(
                layer_group(p, layer_state(j)),
                {key: g},
                lambda grp, leaves: grp.projection_terms(
                    leaves, _slice(refreshed["layers"], j)
                ),
            ),
            lambda g: g_after.projection_terms(
                g_after.treedef.flatten_up_to(g), refreshed["after"]
            ),
        )

        # -- the updates, one group (one layer) at a time -------------------------

        def update(group, group_params, opt_state, group_refreshed, group_sums):
            grads, subspace = group.result(group_refreshed, group_sums)
            return apply(grads, opt_state, group_params, subspace, state)

        new_before, before_state, square = update(
            g_before, before, state.before, refreshed["before"], sums["before"]
        )
        new_after, after_state, square_after = update(
            g_after, after, state.after, refreshed["after"], sums["after"]
        )

        def update_layer(carry, i):
            new_stack, states, square = carry
            params_i = {key: _slice(new_stack, i)}
            state_i = _slice(states, i)
            new_params, new_state, sq = update(
                layer_group(params_i[key], state_i),
                params_i,
                state_i,
                _slice(refreshed["layers"], i),
                _slice(sums["layers"], i),
            )
            new_stack = _put(new_stack, new_params[key], i)
            return (new_stack, _put(states, new_state, i), square + sq), None

        (new_stack, layer_states, square), _ = jax.lax.scan(
            update_layer,
            (stack, state.layers, square + square_after),
            jnp.arange(_stack_size(layers)),
        )
        return new_before, {key: new_stack}, new_after, (
            before_state,
            layer_states,
            after_state,
        ), sums["loss"], square

    return step


def _flat_terms(group: _Group, grads, terms: Callable):
    return terms(group, group.treedef.flatten_up_to(grads))

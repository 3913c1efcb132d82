"""The layer-wise step over micro-batches: gradients accumulate in GaLore's subspace.

A layer-wise step never holds the whole gradient tree, so it cannot sum micro-batches
at full size either. It sums each layer's where GaLore's update reads them: per
projected matrix the low-rank `P^H G` (r x n per layer), the layer's other leaves
(norms) at full size, as `galore_jax.subspace` does for the whole tree. Each pass over
the micro-batches runs the layer-wise backward (`scanned.backward_by_layer`) and adds
each layer's terms as its gradient appears; a refresh step runs the refresh's product
passes first (the same stages as `accumulate_in_subspace`). The optimizer then updates
the layers one at a time from their sums (a scan over the layers), so one layer's
gradient in the subspace is expanded at a time.

The embedding's and the head's gradients (full-size matrices, vocabulary x hidden) are
not summed beside the layers'. The projection pass keeps, per micro-batch, the head's
input and the embedding output's cotangent (batch x hidden each); after the layers'
updates, each of the two groups' mean gradient is formed from them alone and the group
updated from it (refreshed from it where it is projected). At LLaMA-1B with 4
micro-batches this holds the step to 1.08x the peak of the step without accumulation
(docs/results.md).

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
    _read_slice,
    _slice,
    _stack_size,
    _without_layer_axis,
    backward_by_layer,
    embed_gradient,
    head_gradient,
)
from galore_jax.subspace import (
    _Group,
    check_refresh_parts,
    micro_batch_count,
    subspace_engines,
)


def accumulating_step(tx, model: ScannedModel, apply: Callable, refresh_parts: int = 2) -> Callable:
    """The micro-batch step's work, un-jitted (`gj.layerwise_step` wraps it).

    Args:
      tx: the optimizer (a GaLore transformation with a randomized refresh).
      model: the model's `ScannedModel`.
      apply: ``(grads, opt_state, params, subspace, state) -> (params, opt_state,
        square)``, one group's update from its gradient in the subspace (``state``:
        the step's `LayerwiseState`; ``square``: the squared norm of ``grads``, for
        the step's ``grad_norm``).
      refresh_parts: a refresh step's passes run in this many parts of each group's
        projected matrices (see `gj.accumulate_in_subspace`).

    Returns:
      ``(params, state, batches) -> (before, layers, after, states, loss, square)``: each
      group's updated params and optimizer state, the mean loss and the squared global
      norm of the gradient the optimizer saw.
    """
    engines = subspace_engines(tx, "layerwise_step(micro_batches=True)")
    check_refresh_parts(refresh_parts, "layerwise_step(micro_batches=True)")
    key = model.layers_key

    def step(params, state, batches):
        groups = _groups(model, params)
        before, layers, after = groups
        stack = layers[key]
        k = micro_batch_count(batches, "layerwise_step(micro_batches=True)")
        # The mean loss in float32, or wider where the params are.
        loss_dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(params))
        num_layers = _stack_size(layers)

        def layer_group(params_i, state_i):
            return _Group(engines, {key: params_i}, state_i, refresh_parts)

        def zeros(shapes, *lead):
            return jax.tree.map(lambda s: jnp.zeros((*lead, *s.shape), s.dtype), shapes)

        def each_layer(method, *stacks, in_place=False):
            """`method(group, *slices)` for every layer, stacked; the layers run one at a
            time (a layer's temporaries are alive, not the stack's). `in_place`: the
            results (shaped as stacks[0]) overwrite stacks[0]'s slices, each layer reading
            its own slice from the running result, so the stack is held once."""

            def one_layer(i, first=None):
                trees = stacks if first is None else (first, *stacks[1:])
                group = layer_group(_slice(stack, i), _slice(state.layers, i))
                return method(group, *(_slice(t, i) for t in trees))

            into = stacks[0] if in_place else zeros(jax.eval_shape(one_layer, 0), num_layers)
            return jax.lax.fori_loop(
                0,
                num_layers,
                lambda i, acc: _put(acc, one_layer(i, acc if in_place else None), i),
                into,
            )

        def mean_over_micro_batches(terms, parts, keep_ends=False):
            """Each layer's mean `terms(group, gradient leaves, its slice of parts)` over
            the micro-batches (one layer-wise backward each), the mean loss and, with
            `keep_ends`, each micro-batch's `Ends` (the head's and embedding's gradients
            are formed from them after the passes, never summed beside the layers')."""

            def of_layer(i, params_i, g):
                group = layer_group(params_i, _slice(state.layers, i))
                return terms(group, group.treedef.flatten_up_to({key: g}), _slice(parts, i))

            one_layer = _without_layer_axis(stack)
            shapes = jax.eval_shape(lambda p, g: of_layer(0, p, g), one_layer, one_layer)
            initial = {"layers": zeros(shapes, num_layers), "loss": jnp.zeros([], loss_dtype)}

            def add_layer(i, params_i, g, total):
                part = jax.tree.map(jnp.add, _slice(total["layers"], i), of_layer(i, params_i, g))
                return {**total, "layers": _put(total["layers"], part, i)}

            def one_micro_batch(total, batch):
                loss, total, ends = backward_by_layer(
                    model,
                    groups,
                    batch,
                    total,
                    after=None,
                    layer=add_layer,
                    before=None,
                    layer_params=lambda t, i: _slice(stack, i),
                )
                total = {**total, "loss": total["loss"] + loss.astype(loss_dtype)}
                return total, (ends if keep_ends else None)

            total, ends = jax.lax.scan(one_micro_batch, initial, batches)
            return jax.tree.map(lambda x: x / k, total), ends

        # -- the layers' refresh passes (a refresh step only), in parts --------------

        probe = layer_group(_slice(stack, 0), _slice(state.layers, 0))

        def refresh_part(p):  # one part's passes, in every layer at once
            def run_stages(_):
                def body(i, compact):
                    sums, _ = mean_over_micro_batches(
                        lambda group, g, part: group.refresh_terms(g, part, probe.kinds[i], p),
                        compact,
                    )
                    return each_layer(
                        lambda group, c, s: group.refresh_stage(i, c, s, p),
                        compact,
                        sums["layers"],
                        in_place=True,
                    )

                start = each_layer(lambda group: group.refresh_start(p))
                compact = jax.lax.fori_loop(0, probe.num_stages, body, start)
                return each_layer(lambda group, c: group.refresh_finish(c, p), compact)

            def keep(_):
                return each_layer(lambda group: group.refresh_keep(p))

            due = jnp.any(each_layer(lambda group: group.part_due(p)))
            return jax.lax.cond(due, run_stages, keep, None)

        results = [refresh_part(p) for p in range(len(probe.parts))]
        refreshed = each_layer(lambda group, *rs: group.merge(list(rs)), *results)

        # -- the projection pass, then the layers' updates one at a time, then the --
        # -- head's and the embedding's from their own mean gradients              --

        sums, ends = mean_over_micro_batches(
            lambda group, g, part: group.projection_terms(g, part), refreshed, keep_ends=True
        )

        def update(group, group_params, opt_state, group_refreshed, group_sums):
            grads, subspace = group.result(group_refreshed, group_sums)
            return apply(grads, opt_state, group_params, subspace, state)

        # The new projectors go into the state the updates write, and the updates read
        # them there: they are not held twice (nor beside the old ones).
        layer_states = state.layers
        if probe.plan is not None:
            layer_states = probe.plan.with_projectors(state.layers, refreshed[0])

        def update_layer(carry, i):
            new_stack, states = carry
            params_i, state_i = _slice(new_stack, i), _read_slice(states, i)
            group = layer_group(params_i, state_i)
            _, flags, skips = _slice(refreshed, i)
            new_params, new_state, more = update(
                group,
                {key: params_i},
                state_i,
                (group.projectors(), flags, skips),
                _slice(sums["layers"], i),
            )
            new_stack = _put(new_stack, new_params[key], i)
            return (new_stack, _put(states, new_state, i)), more

        (new_stack, layer_states), squares = jax.lax.scan(
            update_layer, (stack, layer_states), jnp.arange(num_layers)
        )

        def update_end(group_params, opt_state, gradient):
            """The head's or the embedding's group updated from its mean gradient, formed
            from each micro-batch's `Ends` (refreshed from it where it is projected)."""
            first = _slice((ends, batches), 0)
            shapes = jax.eval_shape(lambda e, b: gradient(model, group_params, e, b), *first)

            def add(total, xs):
                return jax.tree.map(jnp.add, total, gradient(model, group_params, *xs)), None

            total, _ = jax.lax.scan(add, zeros(shapes), (ends, batches))
            group = _Group(engines, group_params, opt_state, refresh_parts)
            leaves = group.treedef.flatten_up_to(jax.tree.map(lambda x: x / k, total))
            group_refreshed = group.refresh(lambda terms: terms(leaves))
            sums = group.projection_terms(leaves, group_refreshed)
            return update(group, group_params, opt_state, group_refreshed, sums)

        new_after, after_state, more_after = update_end(after, state.after, head_gradient)
        new_before, before_state, more_before = update_end(before, state.before, embed_gradient)
        states = (before_state, layer_states, after_state)
        square = jnp.sum(squares) + more_after + more_before
        return new_before, {key: new_stack}, new_after, states, sums["loss"], square

    return step

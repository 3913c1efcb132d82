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

        def layer_group(params_i, state_i):
            return _Group(engines, {key: params_i}, state_i, refresh_parts)

        groups_now = {
            "before": _Group(engines, before, state.before, refresh_parts),
            "after": _Group(engines, after, state.after, refresh_parts),
        }

        num_layers = _stack_size(layers)

        def zeros(shapes, *lead):
            return jax.tree.map(lambda s: jnp.zeros((*lead, *s.shape), s.dtype), shapes)

        def each_group(method, *trees, in_place=False):
            """`method(group, *parts)` for the embedding's and head's groups and every
            layer's, as {"before", "layers", "after"}. The layers run one at a time (a
            layer's temporaries are alive, not the stack's). `in_place`: the results
            (shaped as trees[0]) overwrite trees[0]'s layer slices, each layer reading
            its own slice from the running result, so the stack is held once."""
            out = {name: method(g, *(t[name] for t in trees)) for name, g in groups_now.items()}

            def one_layer(i, first=None):
                parts = [t["layers"] for t in trees]
                if first is not None:
                    parts[0] = first
                group = layer_group(_slice(stack, i), _slice(state.layers, i))
                return method(group, *(_slice(p, i) for p in parts))

            if in_place:
                into = trees[0]["layers"]
            else:
                into = zeros(jax.eval_shape(one_layer, 0), num_layers)
            out["layers"] = jax.lax.fori_loop(
                0,
                num_layers,
                lambda i, acc: _put(acc, one_layer(i, acc if in_place else None), i),
                into,
            )
            return out

        def mean_over_micro_batches(terms, parts):
            """Each group's mean `terms(group, gradient leaves, its part of parts)` over
            the micro-batches (one layer-wise backward each), and the mean loss."""

            def of_group(name):
                group = groups_now[name]
                return lambda g: terms(group, group.treedef.flatten_up_to(g), parts[name])

            def of_layer(i, params_i, g):
                group = layer_group(params_i, _slice(state.layers, i))
                leaves = group.treedef.flatten_up_to({key: g})
                return terms(group, leaves, _slice(parts["layers"], i))

            one_layer = _without_layer_axis(stack)
            layer_shapes = jax.eval_shape(lambda p, g: of_layer(0, p, g), one_layer, one_layer)
            initial = {
                "before": zeros(jax.eval_shape(of_group("before"), before)),
                "layers": zeros(layer_shapes, num_layers),
                "after": zeros(jax.eval_shape(of_group("after"), after)),
                "loss": jnp.zeros([], loss_dtype),
            }
            add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731

            def add_layer(i, params_i, g, total):
                part = add(_slice(total["layers"], i), of_layer(i, params_i, g))
                return {**total, "layers": _put(total["layers"], part, i)}

            def one_micro_batch(total, batch):
                loss, total = backward_by_layer(
                    model,
                    groups,
                    batch,
                    total,
                    after=lambda g, t: {**t, "after": add(t["after"], of_group("after")(g))},
                    layer=add_layer,
                    before=lambda g, t: {**t, "before": add(t["before"], of_group("before")(g))},
                    layer_params=lambda t, i: _slice(stack, i),
                )
                return {**total, "loss": total["loss"] + loss.astype(loss_dtype)}, None

            total, _ = jax.lax.scan(one_micro_batch, initial, batches)
            return jax.tree.map(lambda x: x / k, total)

        # -- the refresh's passes (a refresh step only) ---------------------------

        # One schedule of product kinds for all groups (one tx, one set of options).
        probe = layer_group(_slice(stack, 0), _slice(state.layers, 0))
        with_refresh = [g for g in (*groups_now.values(), probe) if g.parts]
        assert len({g.stage_kinds for g in with_refresh}) <= 1
        num_parts = max((len(g.parts) for g in with_refresh), default=0)

        def refresh_part(p):  # one part's passes, in every group at once
            def run_stages(_):
                schedule = with_refresh[0]

                def body(i, compact):
                    kind = schedule.kinds[i]
                    sums = mean_over_micro_batches(
                        lambda group, g, part: group.refresh_terms(g, part, kind, p), compact
                    )
                    return each_group(
                        lambda group, c, s: group.refresh_stage(i, c, s, p),
                        compact,
                        sums,
                        in_place=True,
                    )

                start = each_group(lambda group: group.refresh_start(p))
                compact = jax.lax.fori_loop(0, schedule.num_stages, body, start)
                return each_group(lambda group, c: group.refresh_finish(c, p), compact)

            def keep(_):
                return each_group(lambda group: group.refresh_keep(p))

            due = each_group(lambda group: group.part_due(p))
            any_due = due["before"] | due["after"] | jnp.any(due["layers"])
            return jax.lax.cond(any_due, run_stages, keep, None)

        results = [refresh_part(p) for p in range(num_parts)]
        refreshed = each_group(lambda group, *rs: group.merge(list(rs)), *results)

        # -- the projection pass, then the updates one group (one layer) at a time --

        sums = mean_over_micro_batches(
            lambda group, g, part: group.projection_terms(g, part), refreshed
        )

        def update(group, group_params, opt_state, group_refreshed, group_sums):
            grads, subspace = group.result(group_refreshed, group_sums)
            return apply(grads, opt_state, group_params, subspace, state)

        new = {
            name: update(groups_now[name], part, getattr(state, name), refreshed[name], sums[name])
            for name, part in (("before", before), ("after", after))
        }

        def update_layer(carry, i):
            new_stack, states, square = carry
            params_i, state_i = _slice(new_stack, i), _slice(states, i)
            new_params, new_state, more = update(
                layer_group(params_i, state_i),
                {key: params_i},
                state_i,
                _slice(refreshed["layers"], i),
                _slice(sums["layers"], i),
            )
            new_stack = _put(new_stack, new_params[key], i)
            return (new_stack, _put(states, new_state, i), square + more), None

        (new_stack, layer_states, square), _ = jax.lax.scan(
            update_layer,
            (stack, state.layers, new["before"][2] + new["after"][2]),
            jnp.arange(num_layers),
        )
        states = (new["before"][1], layer_states, new["after"][1])
        return new["before"][0], {key: new_stack}, new["after"][0], states, sums["loss"], square

    return step

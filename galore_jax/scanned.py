"""A model of scanned layers (embedding -> stacked layers -> head) and how its
params split into the three groups a layer-wise optimizer sees."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class ScannedModel(NamedTuple):
    """A model as embedding -> scanned layers -> head, over a dict of params.

    Attributes:
      embed: ``(params_before, batch) -> x``, the input of the first layer.
      layer: ``(layer_params, x) -> x``, one layer; ``layer_params`` is one
        slice of ``params[layers_key]`` (no layer axis).
      head: ``(params_after, x, batch) -> loss``, a scalar mean loss.
      layers_key: top-level key of the stacked layer params (leading layer axis).
      before: top-level keys ``embed`` reads (e.g. the token embedding).
      after: top-level keys ``head`` reads (final norm, output head).

    ``params_before`` / ``params_after`` are dicts ``{key: params[key]}``; the
    params' top level must hold exactly ``before + (layers_key,) + after``.
    """

    embed: Callable[[Any, Any], jax.Array]
    layer: Callable[[Any, jax.Array], jax.Array]
    head: Callable[[Any, jax.Array, Any], jax.Array]
    layers_key: str = "layers"
    before: tuple = ()
    after: tuple = ()


# ----------------------------------------------------------------------------
# Params <-> the three groups the optimizer sees.
# ----------------------------------------------------------------------------


def _check_keys(model: ScannedModel, params: Any) -> None:
    try:
        keys = set(params.keys())
    except AttributeError:
        raise TypeError(
            f"layer-wise params must be a dict of top-level params, got {type(params).__name__}"
        ) from None
    wanted = [*model.before, model.layers_key, *model.after]
    missing = [k for k in wanted if k not in keys]
    extra = sorted(keys - set(wanted))
    if missing or extra or len(set(wanted)) != len(wanted):
        raise ValueError(
            f"ScannedModel(before={tuple(model.before)}, layers_key={model.layers_key!r}, "
            f"after={tuple(model.after)}) must name every top-level param key once; "
            f"params have {sorted(keys)} (missing {missing}, unassigned {extra})"
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(params[model.layers_key])[0]:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                f"layer-wise: params[{model.layers_key!r}]{jax.tree_util.keystr(path)} has no "
                "leading layer axis"
            )
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(params[model.layers_key])}
    if len(sizes) != 1:
        raise ValueError(
            f"layer-wise: params[{model.layers_key!r}] leaves disagree on the layer count: "
            f"{sorted(sizes)}"
        )


def _groups(model: ScannedModel, params: Any, *, check: bool = True):
    """(before, layers, after): the dicts the optimizer sees for each group."""
    if check:
        _check_keys(model, params)
    before = {k: params[k] for k in model.before}
    after = {k: params[k] for k in model.after}
    return before, {model.layers_key: params[model.layers_key]}, after


def _merge(params: Any, before: dict, layers: dict, after: dict) -> Any:
    """The three groups back in the params' own container (dict, nnx.State, ...)."""
    treedef = jax.tree.structure(params)
    return treedef.unflatten(jax.tree.leaves({**before, **layers, **after}))


def _without_layer_axis(tree: Any) -> Any:
    """Shapes of one slice of stacked arrays: the leading (layer) axis dropped."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)


def one_layer_view(model: ScannedModel, params: Any) -> dict:
    """The params as the optimizer sees them: ``params[layers_key]`` as one layer's shapes.

    For whatever must read the whole tree the way a layer-wise optimizer sees it
    (labels by the whole-tree rule, ``galore_jax.describe``).
    """
    _check_keys(model, params)
    view = dict(params)
    view[model.layers_key] = _without_layer_axis(params[model.layers_key])
    return view


def _stack_size(layers: dict) -> int:
    return jax.tree.leaves(layers)[0].shape[0]


def _slice(tree: Any, i) -> Any:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _read_slice(tree: Any, i) -> Any:
    """`_slice`, materialised (a conditional's result is never fused into its users)."""
    return jax.lax.cond(i >= 0, _slice, lambda t, i: _slice(t, 0), tree, i)


def _put(tree: Any, part: Any, i) -> Any:
    return jax.tree.map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, 0), tree, part)


# ----------------------------------------------------------------------------
# The backward pass one group at a time.
# ----------------------------------------------------------------------------


class Ends(NamedTuple):
    """What `backward_by_layer` keeps of one micro-batch for the head's and the
    embedding's gradients: `head_gradient` and `embed_gradient` recompute them from it."""

    head_input: jax.Array  # the last layer's output
    embed_cotangent: Any  # the loss's cotangent of the embedding's output


def backward_by_layer(
    model: ScannedModel,
    groups: tuple,
    batch: Any,
    carry: Any,
    *,
    after: Callable | None,
    layer: Callable,
    before: Callable | None,
    layer_params: Callable,
):
    """One micro-batch's loss, with each group's gradient handed on as it appears.

    The forward pass keeps each layer's input only (as rematerialisation does); the
    backward pass runs the layers in reverse, recomputing a layer's forward. Only one
    group's gradient is alive at a time: the head's, then each layer's, then the
    embedding's, each given to its visitor with a carry the visitors thread through.

    Args:
      model: the model's `ScannedModel`.
      groups: ``_groups(model, params)``'s (before, layers, after) dicts.
      batch: one micro-batch.
      carry: the visitors' initial carry.
      after: ``(grads, carry) -> carry`` for the head's group (None: not computed;
        see ``ends``).
      layer: ``(i, layer_params, grads, carry) -> carry`` for layer ``i``.
      before: ``(grads, carry) -> carry`` for the embedding's group (None: likewise).
      layer_params: ``(carry, i) -> layer i's params``: where the backward reads them
        (a step that updates the stack in its carry reads it there, so the params are
        held once).

    Returns:
      ``(loss, carry, ends)``: ``ends`` holds the head's input and the cotangent of the
      embedding's output, from which `head_gradient` and `embed_gradient` give those
      groups' gradients later (XLA drops them where unused).
    """
    before_params, layers, after_params = groups
    x, embed_vjp = jax.vjp(lambda p: model.embed(p, batch), before_params)

    def forward(x, one_layer):
        return model.layer(one_layer, x), x

    x, inputs = jax.lax.scan(forward, x, layers[model.layers_key])
    loss, head_vjp = jax.vjp(lambda p, x: model.head(p, x, batch), after_params, x)
    if jnp.shape(loss) != ():
        raise ValueError(
            f"layer-wise: model.head must return a scalar loss, got shape "
            f"{jnp.shape(loss)}: reduce it in the head (e.g. return the per-token "
            "loss's .mean())"
        )
    grads, dx = head_vjp(jnp.ones_like(loss))
    head_input = x
    if after is not None:
        carry = after(grads, carry)

    def backward(state, i):
        dx, carry = state
        params_i = layer_params(carry, i)
        _, layer_vjp = jax.vjp(model.layer, params_i, _slice(inputs, i))
        grads, dx = layer_vjp(dx)
        return (dx, layer(i, params_i, grads, carry)), None

    (dx, carry), _ = jax.lax.scan(
        backward, (dx, carry), jnp.arange(_stack_size(layers)), reverse=True
    )
    if before is not None:
        (grads,) = embed_vjp(dx)
        carry = before(grads, carry)
    return loss, carry, Ends(head_input, dx)


def head_gradient(model: ScannedModel, after_params: dict, ends: Ends, batch: Any) -> dict:
    """The head group's gradient of one micro-batch's loss, from its `Ends`."""
    return jax.grad(lambda p: model.head(p, ends.head_input, batch))(after_params)


def embed_gradient(model: ScannedModel, before_params: dict, ends: Ends, batch: Any) -> dict:
    """The embedding group's gradient of one micro-batch's loss, from its `Ends`."""
    _, embed_vjp = jax.vjp(lambda p: model.embed(p, batch), before_params)
    return embed_vjp(ends.embed_cotangent)[0]

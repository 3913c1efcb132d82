"""Layer-wise updates: the optimizer runs inside the backward pass of a scanned model.

A standard step computes the whole gradient tree, then hands it to the
optimizer: at its peak the step holds params, optimizer state *and* a gradient
as large as the params. For a model whose layers are stacked and scanned
(``params[layers_key]`` with a leading layer axis), `layerwise_step` runs the
backward pass layer by layer in reverse, rematerialising each layer's forward,
and applies the optimizer to a layer's slice of the params and of the state as
soon as that layer's gradient exists. Only one layer's gradient is alive at a
time; the head (after the layers) and the embedding (before) are updated at
their own points of the backward pass.

The model is described by three functions and the top-level keys of its params
(`ScannedModel`). The optimizer is any optax transformation whose update is
per leaf (AdamW, GaLore, Tensor-GaLore, ...); its state for the layers is the
state of one layer, stacked over the layer axis (`layerwise_init`), so the
scan slices and updates it in place. With the same optimizer, a layer-wise step
gives the standard step's result: GaLore draws a leaf's random sketches from
its path and shares one Gaussian block across a stack, so one layer's slice
sees what the whole stack sees.

What layer-wise cannot do, and what it offers instead:

* Clipping by this step's global norm needs every gradient before any update.
  `clip="layer"` clips each layer's gradient (and the embedding's, and the
  head's) by its own norm; `clip="previous_global"` scales every gradient by
  the factor the *previous* step's global norm implies (computed during this
  backward pass, kept in the state). `clip_by_layer_norm` /
  `clip_by_previous_global_norm` are the same rules for a standard optax chain.
* Gradient accumulation needs the summed gradient, which a layer-wise step never
  holds. With ``micro_batches=True`` (GaLore only) it sums the micro-batches in
  GaLore's subspace instead (`galore_jax.subspace`): each pass over the
  micro-batches runs this backward, adds each projected matrix's low-rank
  ``P^H G`` (every other leaf at full size: norms, embedding, head) and, after
  the last, updates the groups one layer at a time. A refresh step runs the
  randomized refresh's product passes first. The result is the step on the mean
  gradient (float64 tests agree to 1e-9); the clips then read the gradient the
  optimizer sees, ``P P^H G``.

So the optimizer must not clip by a global norm itself: each of its updates
sees one group (one layer, the embedding, the head), and a norm it computed
would be that group's. `layerwise_init` and `layerwise_step` refuse the global
clips they can find in ``tx`` (`optax.clip_by_global_norm`, ``max_grad_norm``
of `galore_adamw` / `tensor_galore_adamw`, `clip_by_layer_norm`,
`clip_by_previous_global_norm`; also chained, partitioned, wrapped or built by
`optax.inject_hyperparams`); a clip written by hand cannot be found.

Example (a user's own scanned model, written as three functions):

  >>> import jax, jax.numpy as jnp, optax
  >>> import galore_jax as gj
  >>> def embed(p, batch):
  ...     return batch["x"] @ p["w_in"]
  >>> def layer(p, x):
  ...     return x + jnp.tanh(x @ p["w"])
  >>> def head(p, x, batch):
  ...     return jnp.mean((x @ p["w_out"] - batch["y"]) ** 2)
  >>> model = gj.ScannedModel(embed, layer, head, layers_key="blocks",
  ...                         before=("w_in",), after=("w_out",))
  >>> k = jax.random.split(jax.random.PRNGKey(0), 3)
  >>> params = {"w_in": jax.random.normal(k[0], (4, 16)) / 2,
  ...           "blocks": {"w": jax.random.normal(k[1], (3, 16, 16)) / 4},
  ...           "w_out": jax.random.normal(k[2], (16, 1)) / 4}
  >>> # One group at a time the labels rule cannot see the whole tree (an embedding
  >>> # table looks like a matrix alone): label by path from the whole params.
  >>> labels = gj.labels.labels_by_path(gj.galore_labels(params, rank=4))
  >>> tx = gj.galore_adamw(1e-2, labels=labels, rank=4, update_proj_gap=5)
  >>> state = gj.layerwise_init(tx, model, params)
  >>> step = jax.jit(gj.layerwise_step(tx, model, max_norm=1.0, clip="layer"))
  >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 1))}
  >>> params, state, metrics = step(params, state, batch)
  >>> sorted(metrics)
  ['grad_norm', 'loss']
  >>> # The same batch as 4 micro-batches of 2, summed in GaLore's subspace.
  >>> step4 = jax.jit(gj.layerwise_step(tx, model, max_norm=1.0, micro_batches=True))
  >>> batches = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)
  >>> params, state, metrics = step4(params, state, batches)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from galore_jax._layerwise_subspace import accumulating_step
from galore_jax._low_rank import GradScaleTransformation
from galore_jax.clipping import (
    _check_max_norm,
    _check_no_global_clip,
    _clip_factor,
    _scale,
    _square_norm,
)
from galore_jax.scanned import (
    ScannedModel,
    _groups,
    _merge,
    _put,
    _read_slice,
    _slice,
    _without_layer_axis,
    backward_by_layer,
    one_layer_view,
)

CLIP_MODES = ("layer", "previous_global")

__all__ = [
    "LayerwiseState",
    "ScannedModel",
    "layerwise_init",
    "layerwise_state_shardings",
    "layerwise_step",
    "one_layer_view",
]


class LayerwiseState(NamedTuple):
    """Optimizer state of a layer-wise step (arrays only).

    ``layers`` is the optimizer's state for ``{layers_key: one layer}``, every
    leaf stacked over a leading layer axis.
    """

    before: optax.OptState
    layers: optax.OptState
    after: optax.OptState
    grad_norm: jax.Array  # shape=(), float32: the last step's global gradient norm


# ----------------------------------------------------------------------------
# The layer-wise step.
# ----------------------------------------------------------------------------


def layerwise_init(tx: optax.GradientTransformation, model: ScannedModel, params: Any):
    """The optimizer state of `layerwise_step`: per group; the layers' stacked.

    Args:
      tx: an optax transformation with a per-leaf update (no global-norm
        clipping in it: use `layerwise_step`'s ``clip``).
      model: the model's `ScannedModel`.
      params: the params (arrays or ``jax.ShapeDtypeStruct``; dict-like top level).

    Raises:
      ValueError: params that do not fit ``model``, or a global-norm clip in ``tx``.
    """
    _check_no_global_clip(tx)
    before, layers, after = _groups(model, params)
    key = model.layers_key
    layer_state = jax.vmap(lambda p: tx.init({key: p}))(layers[key])
    return LayerwiseState(tx.init(before), layer_state, tx.init(after), jnp.zeros([], jnp.float32))


def layerwise_state_shardings(
    abstract_state: LayerwiseState,
    model: ScannedModel,
    params: Any,
    param_shardings: Any,
    state_shardings: Callable,
) -> LayerwiseState:
    """Shardings of a `LayerwiseState` from the params' (layer axis unsharded).

    Args:
      abstract_state: ``jax.eval_shape(layerwise_init, ...)``'s result.
      model, params: as for `layerwise_init` (params may be abstract).
      param_shardings: NamedShardings matching ``params``.
      state_shardings: ``(abstract_state, params, param_shardings) -> shardings``
        for one optimizer state, e.g. `galore_jax.state_shardings`.
    """
    before, layers, after = _groups(model, params)
    s_before, s_layers, s_after = _groups(model, param_shardings, check=False)
    key = model.layers_key

    def drop_layer_axis(s):
        spec = tuple(s.spec)
        if spec and spec[0] is not None:
            raise ValueError(
                f"layer-wise: the layer axis of params[{key!r}] must not be sharded, got {s.spec}"
            )
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec[1:]))

    per_layer = state_shardings(
        _without_layer_axis(abstract_state.layers),
        _without_layer_axis(layers),
        jax.tree.map(drop_layer_axis, s_layers),
    )
    stacked = jax.tree.map(
        lambda s: jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec)),
        per_layer,
    )
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    return LayerwiseState(
        state_shardings(abstract_state.before, before, s_before),
        stacked,
        state_shardings(abstract_state.after, after, s_after),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )


def layerwise_step(
    tx: optax.GradientTransformation,
    model: ScannedModel,
    *,
    max_norm: Optional[float] = None,
    clip: str = "layer",
    micro_batches: bool = False,
    refresh_parts: int = 2,
) -> Callable:
    """``(params, state, batch) -> (params, state, {"loss", "grad_norm"})``, one update.

    The forward pass keeps each layer's input only (as rematerialisation does);
    the backward pass runs the layers in reverse, recomputing a layer's forward,
    and updates that layer's params and state slice in place before the next.

    Args:
      tx: the optimizer (per-leaf update; see `layerwise_init`). A
        `GradScaleTransformation` (`galore_adamw`, ...) gets the clip factor as
        the extra arg `grad_scale`, applied to the low-rank gradients; any
        other gets the gradients scaled in full size.
      model: the model's `ScannedModel`.
      max_norm: None (no clipping) or the clipping threshold.
      clip: "layer" (each layer, the embedding and the head by their own norm)
        or "previous_global" (all by the factor of the previous step's global
        norm); see the module docstring.
      micro_batches: False: ``batch`` is one batch. True: every leaf of ``batch``
        has a leading micro-batch axis, and the step is the mean gradient's,
        accumulated in GaLore's subspace (``tx`` must be a GaLore transformation
        with a randomized refresh; see the module docstring). The clips
        then read the gradient the optimizer sees (``P P^H G`` for a projected
        matrix) and ``grad_norm`` is its norm.
      refresh_parts: with ``micro_batches``, a refresh step's passes run in this many
        parts of each layer's projected matrices (see `gj.accumulate_in_subspace`).

    Returns:
      The step function (jit it; donate params and state to update in place).
      ``grad_norm`` is this step's global gradient norm before clipping.

    Raises:
      ValueError: a bad ``max_norm`` / ``clip``, or a global-norm clip inside
        ``tx`` (see the module docstring); when traced, a ``model.head`` whose
        loss is not a scalar.
    """
    _check_no_global_clip(tx)
    if max_norm is not None:
        _check_max_norm(max_norm)
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    key = model.layers_key

    def clip_factor(grads, state):
        """The configured clip's factor (previous-norm from the state); None: no clip."""
        if max_norm is None:
            return None
        if clip == "previous_global":
            return _clip_factor(state.grad_norm, max_norm)
        return _clip_factor(jnp.sqrt(_square_norm(grads)), max_norm)

    def apply(grads, opt_state, params, state, subspace=None):
        factor = clip_factor(grads, state)
        extra = {} if subspace is None else {"subspace": subspace}
        if factor is None:
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
        elif isinstance(tx, GradScaleTransformation):  # the factor in the low-rank space
            updates, opt_state = tx.update(grads, opt_state, params, grad_scale=factor, **extra)
        else:
            if subspace is not None:
                extra = {"subspace": subspace.scaled(factor)}
            updates, opt_state = tx.update(_scale(grads, factor), opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

    if micro_batches:

        def apply_in_subspace(grads, opt_state, params, subspace, state):
            new_params, opt_state = apply(grads, opt_state, params, state, subspace)
            return new_params, opt_state, _square_norm(grads)

        accumulate = accumulating_step(tx, model, apply_in_subspace, refresh_parts)

        def step_over_micro_batches(params, state, batches):
            before, layers, after, states, loss, square = accumulate(params, state, batches)
            grad_norm = jnp.sqrt(square)
            new_state = LayerwiseState(*states, grad_norm)
            params = _merge(params, before, layers, after)
            return params, new_state, {"loss": loss, "grad_norm": grad_norm}

        return step_over_micro_batches

    def step(params, state, batch):
        groups = _groups(model, params)
        before, layers, after = groups

        def visit_after(grads, carry):
            new_after, after_state = apply(grads, state.after, after, state)
            return {**carry, "after": (new_after, after_state), "square": _square_norm(grads)}

        def visit_layer(i, layer_params, grads, carry):
            new_params, new_state = apply(
                {key: grads}, _read_slice(carry["states"], i), {key: layer_params}, state
            )
            return {
                **carry,
                "stack": _put(carry["stack"], new_params[key], i),
                "states": _put(carry["states"], new_state, i),
                "square": carry["square"] + _square_norm(grads),
            }

        def visit_before(grads, carry):
            new_before, before_state = apply(grads, state.before, before, state)
            square = carry["square"] + _square_norm(grads)
            return {**carry, "before": (new_before, before_state), "square": square}

        loss, carry, _ = backward_by_layer(
            model,
            groups,
            batch,
            {"stack": layers[key], "states": state.layers, "square": jnp.zeros([], jnp.float32)},
            after=visit_after,
            layer=visit_layer,
            before=visit_before,
            layer_params=lambda carry, i: _slice(carry["stack"], i),
        )
        grad_norm = jnp.sqrt(carry["square"])
        (before, before_state), (after, after_state) = carry["before"], carry["after"]
        new_state = LayerwiseState(before_state, carry["states"], after_state, grad_norm)
        params = _merge(params, before, {key: carry["stack"]}, after)
        return params, new_state, {"loss": loss, "grad_norm": grad_norm}

    return step

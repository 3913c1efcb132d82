"""Clipping rules a layer-wise step can apply (and their standard-chain forms), and
the search for global-norm clips inside an optimizer (which a layer-wise step refuses)."""

from __future__ import annotations

import functools
import operator
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import _closures
from galore_jax.scanned import ScannedModel, _groups, _merge


def norm_of_finite_leaves(tree) -> tuple[jax.Array, jax.Array]:
    """(global norm over the leaves whose squared norm is finite, how many are not).

    With every leaf finite the norm is optax.tree.norm's value bit for bit; a NaN /
    inf leaf (which `galore_adamw` zeroes for the step) is left out of it.
    """
    sums = [jnp.sum(jnp.square(x.real) + jnp.square(x.imag)) for x in jax.tree.leaves(tree)]
    finite = [jnp.isfinite(s) for s in sums]
    total = functools.reduce(
        operator.add, [jnp.where(f, s, jnp.zeros_like(s)) for f, s in zip(finite, sums)], 0
    )
    nonfinite = functools.reduce(operator.add, [(~f).astype(jnp.int32) for f in finite], 0)
    return jnp.sqrt(jnp.asarray(total)), jnp.asarray(nonfinite)


def _square_norm(tree: Any) -> jax.Array:
    """Sum of squared magnitudes, in float32 (optax.tree.norm squared)."""
    total = jnp.zeros([], jnp.float32)
    for x in jax.tree.leaves(tree):
        total = total + jnp.sum(jnp.abs(x.astype(jnp.result_type(x, jnp.float32))) ** 2)
    return total


def _clip_factor(norm: jax.Array, max_norm: float) -> jax.Array:
    """optax.clip_by_global_norm's rule as a factor: 1 below max_norm, else max/norm."""
    return jnp.where(norm < max_norm, 1.0, max_norm / jnp.where(norm < max_norm, 1.0, norm))


def _scale(tree: Any, factor: jax.Array) -> Any:
    return jax.tree.map(lambda x: x * factor.astype(x.dtype), tree)


def clip_by_layer_norm(max_norm: float, model: ScannedModel) -> optax.GradientTransformation:
    """Clips each layer's gradient, the embedding's and the head's by its own norm.

    The standard-chain form of ``layerwise_step(..., clip="layer")``: put it
    first in a chain to train with the rule a layer-wise step applies.
    """
    _check_max_norm(max_norm)

    def update_fn(updates, state, params=None):
        del params
        before, layers, after = _groups(model, updates)
        stack = layers[model.layers_key]
        per_layer = jax.vmap(lambda g: _clip_factor(jnp.sqrt(_square_norm(g)), max_norm))(stack)
        stack = jax.tree.map(
            lambda g: g * per_layer.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), stack
        )
        clip_group = lambda t: _scale(t, _clip_factor(jnp.sqrt(_square_norm(t)), max_norm))
        merged = _merge(updates, clip_group(before), {model.layers_key: stack}, clip_group(after))
        return merged, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class ClipByPreviousGlobalNormState(NamedTuple):
    grad_norm: jax.Array  # the previous step's global norm (0 before the first step)


def clip_by_previous_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales gradients by the factor the previous step's global norm implies.

    The standard-chain form of ``layerwise_step(..., clip="previous_global")``;
    the first step is not clipped.
    """
    _check_max_norm(max_norm)

    def init_fn(params):
        del params
        return ClipByPreviousGlobalNormState(jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        norm = jnp.sqrt(_square_norm(updates))
        return _scale(updates, _clip_factor(state.grad_norm, max_norm)), (
            ClipByPreviousGlobalNormState(norm)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _check_max_norm(max_norm) -> None:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")


# ----------------------------------------------------------------------------
# Global-norm clips inside the optimizer: found in its functions' closures.
# ----------------------------------------------------------------------------


@functools.cache
def _clip_codes() -> dict:
    """The code objects of the update functions of the global clips, by name."""
    return {
        optax.clip_by_global_norm(1.0).update.__code__: "optax.clip_by_global_norm",
        clip_by_previous_global_norm(1.0).update.__code__: (
            "gj.clipping.clip_by_previous_global_norm"
        ),
        clip_by_layer_norm(1.0, ScannedModel(None, None, None)).update.__code__: (
            "gj.clipping.clip_by_layer_norm"
        ),
    }


def _injected(obj: Any) -> list:
    """[the transformation an `optax.inject_hyperparams` init function builds], or []."""
    if not isinstance(obj, types.FunctionType):
        return []
    found = _closures.cells(obj)
    factory = found.get("inner_factory")
    hps = [found.get(k) for k in ("other_hps", "numeric_hps", "sched_hps")]
    if not callable(factory) or not all(isinstance(h, dict) for h in hps):
        return []
    other, numeric, sched = hps
    try:
        values = {k: f(f.init()) for k, f in sched.items()}
        return [factory(**other, **numeric, **values)]
    except Exception:  # noqa: BLE001 -- a factory we cannot rebuild: nothing found
        return []


def _global_norm_clips(tx: Any) -> list:
    """Descriptions of the global-norm clips found inside `tx`.

    Walks what `tx` holds (`galore_jax._closures.reachable`), and rebuilds what
    `optax.inject_hyperparams` builds lazily. A transformation held by an
    object (a method's ``self``) or a clip written by hand is not found.
    """
    codes = _clip_codes()
    found = []
    for obj in _closures.reachable(tx, extra=_injected):
        if not isinstance(obj, types.FunctionType):
            continue
        held = _closures.cells(obj)
        name = codes.get(obj.__code__)
        if name is not None:
            found.append(f"{name}({held.get('max_norm', '...')})")
        elif obj.__module__ == "galore_jax._fused" and held.get("max_grad_norm") is not None:
            found.append(
                "an alias's (gj.galore_adamw, tensor_galore_adamw, fira_adamw, apollo_adamw, "
                f"apollo_mini_adamw) max_grad_norm={held['max_grad_norm']}"
            )
    return sorted(set(found))


def _check_no_global_clip(tx: Any) -> None:
    clips = _global_norm_clips(tx)
    if clips:
        raise ValueError(
            f"layer-wise: the optimizer clips by a global norm itself ({', '.join(clips)}); "
            "each of its updates sees one layer (or the embedding, or the head), so that "
            "norm would be per layer, not global. Take the clip out of the optimizer and "
            "let the step clip: layerwise_step(tx, model, max_norm=..., clip='layer') "
            "(each layer, the embedding and the head by its own norm) or "
            "clip='previous_global' (all gradients by the factor of the previous step's "
            "global norm)"
        )

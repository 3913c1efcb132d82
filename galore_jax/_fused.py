"""The AdamW chain of the aliases, with its scalars applied in the low-rank space.

[clip_by_global_norm(max_grad_norm)]                 optional
-> partition(labels -> {galore, tensor_galore, adam})   low-rank or plain Adam scaling
-> add_decayed_weights(weight_decay)                 decoupled decay, full space
-> scale_by_learning_rate(learning_rate)             schedules allowed

The state is that chain's (without the clip, which keeps none), but the update
is fused: the clip factor and the learning rate are scalars that commute with
the projections, so they are applied to the low-rank gradients and updates,
not to full-size arrays (see `_fused_update`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from galore_jax import labels as labels_lib
from galore_jax._checks import check_scalar_arg
from galore_jax._low_rank import (
    GradScaleTransformation,
    engines_of,
    register_bias_correction,
    register_engines,
    scaled_by,
    zero_if_not_finite,
)
from galore_jax.adam import scale_by_adam_8bit
from galore_jax.clipping import norm_of_finite_leaves
from galore_jax.complex_grads import check_complex_grads
from galore_jax.options import AdamOptions


def adam(options: AdamOptions) -> optax.GradientTransformation:
    """Adam's scaling with 32-bit (optax) or block-wise 8-bit moments."""
    if options.bits == 8:
        return scale_by_adam_8bit(b1=options.b1, b2=options.b2, eps=options.eps)
    tx = optax.scale_by_adam(
        b1=options.b1, b2=options.b2, eps=options.eps, mu_dtype=options.mu_dtype
    )
    return register_bias_correction(tx, options.b1, options.b2)


def _decayed_weights(weight_decay, mask, name):
    """optax.add_decayed_weights; a literal 0 is the identity (needs no params), and
    a missing params argument is an error that names `weight_decay`."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return optax.identity()
    inner = optax.add_decayed_weights(weight_decay, mask)

    def update_fn(updates, state, params=None):
        if not jax.tree.leaves(updates):  # an empty tree: nothing to decay
            return updates, state
        if params is None:
            raise ValueError(
                f"{name}(weight_decay={weight_decay!r}) decays the params, so tx.update needs "
                "them: call tx.update(grads, state, params), or set weight_decay=0"
            )
        return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update_fn)


def _clip_factor(updates, max_norm, grad_scale=None):
    """optax.clip_by_global_norm's factor for `grad_scale * updates`: 1 below
    `max_norm`, else max_norm / norm, the norm taken over the finite leaves (each
    member zeroes a non-finite leaf for the step, so one NaN cannot scale every
    other leaf to NaN)."""
    norm, _ = norm_of_finite_leaves(updates)
    if grad_scale is not None:
        norm = norm * jnp.abs(jnp.asarray(grad_scale, norm.dtype))
    return jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)


def _times(a, b):
    """a * b for optional scalars (None: 1)."""
    return b if a is None else a * b


def _with_scales(inner: optax.GradientTransformation) -> GradScaleTransformation:
    """`inner` (Adam on full-size leaves) that takes the low-rank transforms' extra
    args `grad_scale` / `update_scale`; the multiplies fuse into Adam's own pass.
    A leaf whose gradient is not finite counts as a zero gradient for the step, as
    in the low-rank transforms."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, *, grad_scale=None, update_scale=None, **extra):
        scaled = lambda tree, f: jax.tree.map(lambda x: scaled_by(x, f), tree)
        updates = jax.tree.map(zero_if_not_finite, scaled(updates, grad_scale))
        updates, state = inner.update(updates, state, params, **extra)
        return scaled(updates, update_scale), state

    return GradScaleTransformation(inner.init, update_fn)


def _fused_update(partition, decay, lr_stage, max_grad_norm):
    """The update of chain(clip, partition, decay, scale_by_learning_rate), with the
    clip factor and -lr handed to the partition's members as scalars.

    Per leaf: the member returns -lr * (its update) (low-rank members scale the
    small array before projecting back); the decay then adds wd * (-lr * param),
    which is -lr * (update + wd * param) as in the chain. An extra arg
    `grad_scale` multiplies the gradients before everything (the clip's norm
    included), as an `optax.scale` stage chained first would.
    """

    def update_fn(updates, state, params=None, *, grad_scale=None, **extra_args):
        check_scalar_arg("grad_scale", grad_scale)
        check_complex_grads(updates, params, where="update")
        partition_state, decay_state, lr_state = state
        # The lr stage on a scalar 1: optax's step size (schedule, sign) and count.
        step, lr_state = lr_stage.update(jnp.ones([], jnp.float32), lr_state)
        if max_grad_norm is not None:  # the clip sees grad_scale * updates
            grad_scale = _times(grad_scale, _clip_factor(updates, max_grad_norm, grad_scale))
        updates, partition_state = partition.update(
            updates, partition_state, params, grad_scale=grad_scale, update_scale=step, **extra_args
        )
        decay_params = params
        if params is not None:
            decay_params = jax.tree.map(lambda p: p * jnp.asarray(step, p.dtype), params)
        updates, decay_state = decay.update(updates, decay_state, decay_params)
        return updates, (partition_state, decay_state, lr_state)

    return update_fn


def adamw_chain(
    learning_rate,
    *,
    max_grad_norm,
    labeler,
    adam_options: AdamOptions,
    weight_decay,
    weight_decay_mask,
    galore_tx,
    tensor_tx,
    name,
) -> GradScaleTransformation:
    """The aliases' optimizer: `galore_tx(adam)` / `tensor_tx(adam)` / plain Adam by label."""
    members = {
        labels_lib.GALORE: galore_tx(adam(adam_options)),
        labels_lib.TENSOR_GALORE: tensor_tx(adam(adam_options)),
    }
    partition = optax.partition(
        {
            **members,
            labels_lib.ADAM: _with_scales(adam(adam_options)),
        },
        labeler.labels,
    )
    decay = _decayed_weights(weight_decay, weight_decay_mask, name)
    lr_stage = optax.scale_by_learning_rate(learning_rate)
    chain = optax.chain(partition, decay, lr_stage)  # its init: the state tree
    tx = GradScaleTransformation(
        chain.init, _fused_update(partition, decay, lr_stage, max_grad_norm)
    )
    labels_lib.register_explainer(tx.init, labeler.explain)
    register_engines(
        tx,
        [
            engine._replace(view=functools.partial(_labelled_view, labeler.labels, label))
            for label, member in members.items()
            for engine in engines_of(member)
        ],
    )
    return tx


def _labelled_view(labels, label, params):
    """The tree a partition member is given: params with other labels' leaves masked."""
    labels = labels(params) if callable(labels) else labels
    return jax.tree.map(lambda x, lab: x if lab == label else optax.MaskedNode(), params, labels)

"""Master weights: a float32 copy of 16-bit params that the optimizer updates.

With bf16 params the forward and backward read half the weight bytes and need no
per-matmul casts, but `params + update` is rounded to bf16 every step: an update
smaller than half a bf16 ulp of its param (8 bits of mantissa: |u| < |p| / 512)
is lost, and late in a cosine schedule most are. `with_master_weights(tx)` keeps
the params' `dtype` copy (float32 by default) in the optimizer state; `tx` runs on
that copy (its moments, projectors and weight decay see float32 params), the copy
accumulates every update in float32, and the returned updates take the params to
the copy rounded to their dtype. Params already as wide as `dtype` gain nothing and
get a copy all the same (4 bytes per param).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax._low_rank import GradScaleTransformation

__all__ = ["MasterWeightsState", "with_master_weights"]


class MasterWeightsState(NamedTuple):
    """`master`: the params in the wider dtype; `inner_state`: `tx`'s state on them."""

    master: Any
    inner_state: Any


def _wide(dtype, master_dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, master_dtype)


def with_master_weights(
    tx: optax.GradientTransformation, dtype: Any = jnp.float32
) -> optax.GradientTransformationExtraArgs:
    """`tx` on a `dtype` master copy of the params (see the module docstring).

    The update needs the params (`tx.update(grads, state, params)`, as
    `nnx.Optimizer` and `optax.apply_updates` loops pass them); the returned
    updates are in the master's dtype, and `optax.apply_updates(params, updates)`
    lands exactly on the master rounded to each param's dtype (under `jit` the
    update and its application fuse into one elementwise pass). Extra args reach `tx`; when
    `tx` takes `grad_scale` (a `GradScaleTransformation`, e.g. `gj.galore_adamw`)
    so does the result.

    Args:
      tx: the optimizer.
      dtype: the master copy's dtype (each leaf gets the wider of it and its own).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a `MasterWeightsState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> grads = {"w": jnp.ones((16, 8), jnp.bfloat16)}
      >>> def train(tx, steps=10):  # each step's 1e-3 is below half a bf16 ulp of 1.0
      ...     params = {"w": jnp.ones((16, 8), jnp.bfloat16)}
      ...     state = tx.init(params)
      ...     for _ in range(steps):
      ...         updates, state = tx.update(grads, state, params)
      ...         params = optax.apply_updates(params, updates)
      ...     return float(params["w"][0, 0])
      >>> train(optax.sgd(1e-3)), train(gj.with_master_weights(optax.sgd(1e-3)))
      (1.0, 0.98828125)
    """
    dtype = jnp.dtype(dtype)
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, _wide(p.dtype, dtype)), params)
        return MasterWeightsState(master, inner.init(master))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "with_master_weights needs the params to round the master to: call "
                "tx.update(grads, state, params)"
            )
        inner_updates, inner_state = inner.update(
            updates, state.inner_state, state.master, **extra_args
        )
        master = optax.apply_updates(state.master, inner_updates)
        # In the master's dtype: the difference of two values of the param's dtype is
        # exact there, so p + u (optax.apply_updates adds in it and casts back) is the
        # rounded master exactly; in the param's dtype it need not be (|u| ~ |p|).
        to_master = jax.tree.map(
            lambda m, p: m.astype(p.dtype).astype(m.dtype) - p.astype(m.dtype), master, params
        )
        return to_master, MasterWeightsState(master, inner_state)

    takes_grad_scale = isinstance(tx, GradScaleTransformation)
    make = GradScaleTransformation if takes_grad_scale else optax.GradientTransformationExtraArgs
    return make(init_fn, update_fn)

"""Adam with PyTorch's epsilon placement, for reproducing galore-torch exactly.

optax.scale_by_adam divides the bias-corrected moments, m_hat / (sqrt(v_hat) + eps);
torch.optim.AdamW (and galore-torch's GaLoreAdamW) add eps to the uncorrected
root: sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). The two agree for small
eps and differ early in training at large eps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax._low_rank import register_bias_correction
from galore_jax._quantization import (
    DEFAULT_BLOCK_SIZE,
    MU_KIND,
    NU_KIND,
    QuantizedArray,
    QuantizedComplex,
    _get_map,
    as_quantized,
    block_layout,
    dequantize,
    quantize_like,
)


class ScaleByTorchAdamState(NamedTuple):
    count: jax.Array  # shape=(), dtype=jnp.int32.
    mu: optax.Updates
    nu: optax.Updates


def scale_by_torch_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """Adam scaling with torch's eps convention (complex-safe: nu tracks |g|^2).

    Example:
      >>> import jax.numpy as jnp
      >>> import galore_jax as gj
      >>> tx = gj.scale_by_torch_adam(eps=1e-2)
      >>> u, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
      >>> round(float(u["w"][0]), 4)  # sqrt(1-b2)/(1-b1) * 0.1 / (sqrt(0.001) + 0.01)
      0.7597
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaleByTorchAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(
            lambda v, g: b2 * v + (1 - b2) * (jnp.abs(g) ** 2).astype(v.dtype), state.nu, updates
        )
        count = state.count + 1
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(
            lambda m, v: (step * m / (jnp.sqrt(jnp.real(v)) + eps)).astype(m.dtype), mu, nu
        )
        return out, ScaleByTorchAdamState(count, mu, nu)

    # Fira's / APOLLO's norm-growth limiter reads the bias-correction factor.
    return register_bias_correction(optax.GradientTransformation(init_fn, update_fn), b1, b2)


class ScaleByAdam8bitState(NamedTuple):
    """State of `scale_by_adam_8bit` (arrays only)."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    mu: optax.Updates  # per leaf: QuantizedArray / QuantizedComplex (MU_KIND) or float32 array.
    nu: optax.Updates  # per leaf: QuantizedArray (NU_KIND) or float32 array.


def _zeros_quantized(shape, dtype, kind, block_size):
    """What `quantize(jnp.zeros(shape, dtype), ...)` returns, built directly (cheap init)."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        part = _zeros_quantized(shape, jnp.float32, kind, block_size)
        return QuantizedComplex(part, part)
    zero_code = int(np.flatnonzero(_get_map(kind).values == 0)[0])
    _, nb = block_layout(shape[-1], block_size)
    return QuantizedArray(
        jnp.full(shape, zero_code, jnp.uint8), jnp.zeros((*shape[:-1], nb), jnp.float32)
    )


def _full_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _real_dtype(dtype):
    return jnp.finfo(dtype).dtype


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_size: int = 4096,
) -> optax.GradientTransformation:
    """Adam scaling with block-wise 8-bit moments (bitsandbytes-style Adam8bit).

    Same math as `optax.scale_by_adam` (bias correction, eps outside and
    eps_root inside the root; complex-safe: mu is complex, nu tracks |g|^2).
    Each step, leaf by leaf: dequantize mu and nu, update them in float32,
    compute the update from the float32 moments, requantize them for storage.
    So a step's update is exact given the stored state; only the stored moments
    carry rounding. mu uses the map `MU_KIND`, nu `NU_KIND` (see module docstring).

    Leaves with fewer than `min_size` elements, no axes, or fewer than 2
    elements in their last axis keep full-precision moments (float32, or the
    leaf's dtype if wider; complex64 mu for complex leaves), as in bitsandbytes.
    Needs no params, so it can be `scale_by_galore(base_optimizer=...)`.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the root of the second moment.
      eps_root: added to the second moment inside the root.
      block_size: nominal block size along each leaf's last axis (`block_layout`).
      min_size: leaves with fewer elements stay full precision.

    Returns:
      An `optax.GradientTransformation`.

    Example:
      >>> import jax, numpy as np, optax
      >>> import galore_jax as gj
      >>> params = {"w": np.zeros((64, 128), np.float32), "b": np.zeros((128,), np.float32)}
      >>> tx = optax.chain(gj.scale_by_adam_8bit(), optax.scale(-1e-3))
      >>> state = tx.init(params)
      >>> type(state[0].mu["w"]).__name__, state[0].mu["w"].codes.dtype, state[0].mu["b"].dtype
      ('QuantizedArray', dtype('uint8'), dtype('float32'))
      >>> updates, state = jax.jit(tx.update)(jax.tree.map(np.ones_like, params), state)
      >>> round(float(np.asarray(updates["w"])[0, 0]), 6)
      -0.001

    References:
      Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022.
      https://arxiv.org/abs/2110.02861
    """
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    block_layout(1, block_size)  # validates block_size

    def quantized_leaf(x) -> bool:
        shape = jnp.shape(x)
        return len(shape) >= 1 and shape[-1] >= 2 and math.prod(shape) >= min_size

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        mu, nu = [], []
        for x in leaves:
            dtype = _full_dtype(jnp.result_type(x))
            m = jnp.zeros(jnp.shape(x), dtype)
            v = jnp.zeros(jnp.shape(x), _real_dtype(dtype))
            if quantized_leaf(x):
                m = _zeros_quantized(m.shape, m.dtype, MU_KIND, block_size)
                v = _zeros_quantized(v.shape, v.dtype, NU_KIND, block_size)
            mu.append(m)
            nu.append(v)
        return ScaleByAdam8bitState(
            jnp.zeros([], jnp.int32), treedef.unflatten(mu), treedef.unflatten(nu)
        )

    def update_fn(updates, state, params=None):
        del params
        grads, treedef = jax.tree.flatten(updates)
        mus = [as_quantized(x) for x in treedef.flatten_up_to(state.mu)]
        nus = [as_quantized(x) for x in treedef.flatten_up_to(state.nu)]
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1 = 1 - b1**t
        c2 = 1 - b2**t
        out, new_mu, new_nu = [], [], []
        for g, mq, vq in zip(grads, mus, nus):
            dtype = _full_dtype(jnp.result_type(g))
            m = dequantize(mq, kind=MU_KIND, dtype=dtype)
            v = dequantize(vq, kind=NU_KIND, dtype=_real_dtype(dtype))
            gf = g.astype(dtype)
            m = b1 * m + (1 - b1) * gf
            v = b2 * v + (1 - b2) * (jnp.real(gf) ** 2 + jnp.imag(gf) ** 2).astype(v.dtype)
            u = (m / c1.astype(v.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype) + eps_root) + eps)
            out.append(u.astype(jnp.result_type(g)))
            new_mu.append(quantize_like(m, mq, kind=MU_KIND))
            new_nu.append(quantize_like(v, vq, kind=NU_KIND))
        return treedef.unflatten(out), ScaleByAdam8bitState(
            count, treedef.unflatten(new_mu), treedef.unflatten(new_nu)
        )

    return register_bias_correction(optax.GradientTransformation(init_fn, update_fn), b1, b2)

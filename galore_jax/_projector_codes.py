"""Low-bit projectors (Q-GaLore): symmetric int8 / packed int4 codes with per-vector or
per-group float32 scales, NamedTuples of arrays (jit, sharding, orbax keep them)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from galore_jax._quantization import (
    _expand_scales,
    _from_blocks,
    _local_last,
    _match_spec,
    _normalize,
    _replicate_last,
    _to_blocks,
)


class QuantizedProjector(NamedTuple):
    """A projector (basis) stored as int8 or packed int4 codes with per-group scales.

    With `axis` the axis along which each basis vector runs (-2 for U of shape
    (..., m, r), -1 for Vh of shape (..., r, n)): int8 codes have the
    projector's shape, int4 codes have that axis halved (rounded up, two values
    per byte), and scales have that axis replaced by the number of groups
    (1 for per-vector scales). All other axes are the projector's axes.
    """

    # shape=p.shape (int8) or p.shape with axis -> ceil(len / 2) (int4); dtype=jnp.int8 / jnp.uint8.
    codes: jax.Array
    scales: jax.Array  # shape=p.shape with axis -> num_groups, dtype=jnp.float32.


@functools.partial(jax.jit, static_argnames=("axis",))
def pack_int4(x: jax.Array, *, axis: int = -2) -> jax.Array:
    """Packs int values in [-8, 7] two per byte along `axis` (odd length: zero pad).

    Element 2i goes to the low nibble, 2i+1 to the high nibble, both in two's
    complement; the result is uint8 with `axis` of length ceil(len / 2).

    Example:
      >>> import numpy as np
      >>> from galore_jax._projector_codes import pack_int4, unpack_int4
      >>> v = np.arange(-8, 7, dtype=np.int8)  # 15 values, odd length
      >>> p = pack_int4(v, axis=0)
      >>> p.shape, p.dtype, np.array_equal(unpack_int4(p, 15, axis=0), v)
      ((8,), dtype('uint8'), True)
    """
    x = jnp.moveaxis(jnp.asarray(x), axis, -1)
    n = x.shape[-1]
    x = _local_last(x, -(-n // 2), 2)
    if n % 2:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
    nib = (x.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    pairs = nib.reshape(*nib.shape[:-1], -1, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return jnp.moveaxis(packed, -1, axis)


@functools.partial(jax.jit, static_argnames=("length", "axis"))
def unpack_int4(packed: jax.Array, length: int, *, axis: int = -2) -> jax.Array:
    """Inverse of `pack_int4`: int8 values in [-8, 7], `axis` of length `length`."""
    p = jnp.moveaxis(jnp.asarray(packed), axis, -1).astype(jnp.int32)
    if length != 2 * p.shape[-1]:
        p = _replicate_last(p)
    nib = jnp.stack([p & 0xF, p >> 4], axis=-1)
    vals = jnp.where(nib >= 8, nib - 16, nib).astype(jnp.int8)
    vals = vals.reshape(*vals.shape[:-2], -1)[..., :length]
    return jnp.moveaxis(vals, -1, axis)


def _check_bits(bits):
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")


def _group_layout(n: int, group_size: Optional[int]) -> tuple[int, int]:
    if group_size is None:
        return n, 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be None or an int >= 1, got {group_size!r}")
    if group_size >= n:
        return n, 1
    ng = -(-n // group_size)
    return -(-n // ng), ng


@functools.partial(jax.jit, static_argnames=("bits", "axis", "group_size"))
def quantize_projector(
    p: jax.Array, bits: int = 8, *, axis: int = -2, group_size: Optional[int] = None
) -> QuantizedProjector:
    """Symmetric absmax, round-to-nearest int8 or int4 quantization of a basis.

    Each basis vector runs along `axis` (-2 for U of shape (..., m, r), -1 for
    Vh of shape (..., r, n)). Scales are per vector (`group_size=None`) or per
    group of `group_size` consecutive values along `axis` (Q-GaLore: INT4,
    group 256); a length that `group_size` does not divide gets ceil(len /
    group_size) groups of ceil(len / num_groups) values, the last one shorter.
    Levels: int8 in [-127, 127], int4 in [-7, 7] (two per byte along `axis`,
    see `pack_int4`), so a value's error is at most scale / 254 or scale / 14
    where scale is its group's absmax. Non-finite entries are stored as 0 and
    left out of the scales (refreshes never produce them). Real only.

    Args:
      p: real projector, at least 1-D.
      bits: 8 or 4.
      axis: the axis along which basis vectors run (packing and groups).
      group_size: None (per vector) or the group length along `axis`.

    Returns:
      `QuantizedProjector(codes, scales)`.

    Example:
      >>> import numpy as np
      >>> from galore_jax import _projector_codes as q
      >>> u = np.linalg.qr(np.random.default_rng(0).standard_normal((513, 8)))[0]
      >>> qu = q.quantize_projector(u.astype(np.float32), 4, group_size=256)  # Q-GaLore
      >>> qu.codes.shape, qu.codes.dtype, qu.scales.shape
      ((257, 8), dtype('uint8'), (3, 8))
      >>> u4 = np.asarray(q.dequantize_projector(qu, 4, np.float32, u.shape))
      >>> bool(np.linalg.norm(u4 - u) / np.linalg.norm(u) < 0.15)
      True
    """
    _check_bits(bits)
    p = jnp.asarray(p)
    if jnp.issubdtype(p.dtype, jnp.complexfloating) or not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(
            f"quantize_projector needs a real float projector, got dtype {p.dtype}; "
            "quantize real and imaginary parts of complex bases separately"
        )
    if p.ndim < 1:
        raise ValueError(f"quantize_projector needs at least one axis, got shape {p.shape}")
    x0 = jnp.moveaxis(p, axis, -1).astype(jnp.promote_types(p.dtype, jnp.float32))
    n = x0.shape[-1]
    group, ng = _group_layout(n, group_size)
    x = _local_last(x0, ng, group)
    blocks = _to_blocks(x, group, ng)
    finite = jnp.isfinite(blocks)
    blocks = jnp.where(finite, blocks, 0)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    qmax = 127 if bits == 8 else 7
    ints = jnp.clip(jnp.round(_normalize(blocks, absmax) * qmax), -qmax, qmax).astype(jnp.int8)
    ints = _from_blocks(ints, n)
    codes = _match_spec(ints if bits == 8 else pack_int4(ints, axis=-1), x0)
    scales = _match_spec(absmax.astype(jnp.float32), x0)
    return QuantizedProjector(jnp.moveaxis(codes, -1, axis), jnp.moveaxis(scales, -1, axis))


def dequantize_projector(
    q: QuantizedProjector, bits: int, dtype, shape, *, axis: int = -2
) -> jax.Array:
    """Inverse of `quantize_projector` (up to rounding).

    Args:
      q: the `QuantizedProjector`.
      bits: 8 or 4, as quantized.
      dtype: result dtype.
      shape: the projector's shape (fixes odd int4 lengths).
      axis: as quantized.

    Returns:
      The projector, `shape` and `dtype`.
    """
    return _dequantize_projector(q, bits, dtype, tuple(int(d) for d in shape), axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _dequantize_projector(q, bits, dtype, shape, axis):
    _check_bits(bits)
    n = shape[axis]
    codes = jnp.moveaxis(q.codes, axis, -1)
    ints = codes if bits == 8 else unpack_int4(codes, n, axis=-1)
    scales = _expand_scales(jnp.moveaxis(q.scales, axis, -1), n)
    qmax = 127 if bits == 8 else 7
    x = ints.astype(jnp.float32)
    x = _match_spec(x * _match_spec(scales / qmax, x), codes)
    x = jnp.moveaxis(x, -1, axis)
    if x.shape != tuple(shape):
        raise ValueError(
            f"dequantize_projector: codes give shape {x.shape}, asked for {tuple(shape)}"
        )
    return x.astype(dtype)

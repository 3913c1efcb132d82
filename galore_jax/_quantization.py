"""Block-wise 8-bit quantization of optimizer moments (`gj.scale_by_adam_8bit` uses it).

Everything here is a NamedTuple of arrays (jit, sharding, orbax and flax's
`nnx.Optimizer` keep them), shapes are static, and every function is jittable.

Moments (`quantize` / `dequantize`): blocks along the LAST axis only (see
`block_layout`), one float32 absmax scale per block, one uint8 code per value:
    value       (*lead, n)
    codes       (*lead, n)              uint8, same shape (and sharding) as the value
    scales      (*lead, num_blocks)     float32
Code 255 of every map is reserved for non-finite values (dequantized as NaN,
ignored by the block's scale, so a NaN stays in its own element).

Maps (`kind`), each 255 finite levels + the NaN code:
  * "linear": signed absmax int8 grid (i - 127) / 127.
  * "dynamic": bitsandbytes' signed dynamic-exponent map (7 decades, more
    levels in the upper decades), made symmetric with exact +-1.
  * "linear_unsigned" / "dynamic_unsigned": the same for values >= 0.
  * "sqrt_linear" / "sqrt_dynamic": quantize sqrt(x) with the unsigned map,
    square on dequantization (halves the dynamic range in log scale).

Moments use `MU_KIND = "dynamic"` and `NU_KIND = "sqrt_dynamic"`, chosen by
measurement (docs/design.md, "Low-bit state": the only nu map that never zeroes
a nonzero second moment on wide-range blocks).

Sharding: quantization never mixes values across axes other than the last.
In Explicit mode the codes keep the value's sharding; scales (and packed int4
codes) take the value's sharding on every axis whose length the shard count
divides (so the scales' last axis is sharded like the value's last axis when
num_blocks is a multiple of its shard count, else replicated). A last axis
whose blocks cannot line up with its shards is gathered for the elementwise
math and the codes are resharded back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax import _sharding_ops as sops

DEFAULT_BLOCK_SIZE = 256
NAN_CODE = 255  # Reserved code of every map: a non-finite input, dequantized as NaN.


class QuantizedArray(NamedTuple):
    """A real array stored as 8-bit codes plus one float32 scale per block.

    Blocks run along the last axis only (see `block_layout`), so every other
    axis of `codes` and `scales` is the value's axis.
    """

    codes: jax.Array  # shape=value.shape, dtype=jnp.uint8.
    scales: jax.Array  # shape=(*value.shape[:-1], num_blocks), dtype=jnp.float32.


class QuantizedComplex(NamedTuple):
    """A complex array: real and imaginary parts quantized separately."""

    real: QuantizedArray
    imag: QuantizedArray


def _field(x, name):
    if isinstance(x, Mapping):
        return x.get(name)
    try:
        return getattr(x, name, None)
    except Exception:  # pylint: disable=broad-except
        return None


def as_quantized(x):
    """`x` as a `QuantizedArray` / `QuantizedComplex` if it is one or looks like one.

    flax's `nnx.Optimizer` writes each new state back into its `nnx.State`, which
    turns a NamedTuple nested under a dict (e.g. `mu["kernel"]`) into a mapping
    {codes, scales} / {real, imag} from the second step on; this rebuilds ours.
    Plain arrays and anything else are returned unchanged. The functions here
    call it on their inputs; use it before `isinstance` checks on state leaves.
    """
    if isinstance(x, (QuantizedArray, QuantizedComplex, jax.Array, np.ndarray)):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    codes, scales = _field(x, "codes"), _field(x, "scales")
    if codes is not None and scales is not None:
        return QuantizedArray(codes, scales)
    real, imag = _field(x, "real"), _field(x, "imag")
    if real is not None and imag is not None:
        return QuantizedComplex(as_quantized(real), as_quantized(imag))
    return x


def value_shape(x) -> tuple:
    """Shape of the value `x` stands for (a quantized container's, or a plain array's)."""
    x = as_quantized(x)
    if isinstance(x, QuantizedComplex):
        x = x.real
    if isinstance(x, QuantizedArray):
        return tuple(x.codes.shape)
    return tuple(jnp.shape(x))


def is_quantized(x) -> bool:
    """Whether `x` is a `QuantizedArray` or `QuantizedComplex` (or such a container
    after a round trip through flax's `nnx.State`), not a plain array."""
    return isinstance(as_quantized(x), (QuantizedArray, QuantizedComplex))


def _dynamic_values(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic-exponent map (7 decades), adjusted to 255 finite values.

    bitsandbytes' `create_dynamic_map` gives 256 values: 0, 1 and, for decades
    10^-6 .. 10^0, the midpoints of a linear grid on [0.1, 1] scaled by the
    decade (2^i points per sign in decade i for the signed map, 2^(i+1) for the
    unsigned one). To free code 255 for NaN and make the block maximum exact for
    both signs, the largest interior point (0.993 signed, 0.996 unsigned) is
    dropped and, in the signed map, -0.993 becomes -1.
    """
    data = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data.extend(10.0 ** (i - 6) * means)
        if signed:
            data.extend(-(10.0 ** (i - 6)) * means)
    data += [0.0, 1.0]
    values = np.sort(np.asarray(data, np.float64))
    assert values.size == 256
    if signed:
        values[0] = -1.0
    return np.delete(values, -2)


class _Map(NamedTuple):
    values: np.ndarray  # (255,) float32, sorted: the finite code book (code i -> values[i]).
    signed: bool
    sqrt: bool  # quantize sqrt(x), square on dequantize
    linear: bool  # uniform grid: encode by rounding instead of searching


def _make_maps():
    lin_signed = (np.arange(255, dtype=np.float64) - 127.0) / 127.0
    lin_unsigned = np.arange(255, dtype=np.float64) / 254.0
    dyn_signed, dyn_unsigned = _dynamic_values(True), _dynamic_values(False)
    f32 = lambda v: v.astype(np.float32)
    return {
        "linear": _Map(f32(lin_signed), True, False, True),
        "dynamic": _Map(f32(dyn_signed), True, False, False),
        "linear_unsigned": _Map(f32(lin_unsigned), False, False, True),
        "dynamic_unsigned": _Map(f32(dyn_unsigned), False, False, False),
        "sqrt_linear": _Map(f32(lin_unsigned), False, True, True),
        "sqrt_dynamic": _Map(f32(dyn_unsigned), False, True, False),
    }


_MAPS = _make_maps()
KINDS = tuple(_MAPS)

MU_KIND = "dynamic"  # map used by scale_by_adam_8bit for first moments (signed)
NU_KIND = "sqrt_dynamic"  # map used by scale_by_adam_8bit for second moments (non-negative)


def map_levels(kind: str) -> np.ndarray:
    """The 255 finite levels of map `kind` (sorted, in [-1, 1] or [0, 1]); code i -> level i.

    For "sqrt_*" kinds the levels apply to sqrt(x) / max(sqrt(x)) of the block.

    Example:
      >>> from galore_jax._quantization import map_levels
      >>> v = map_levels("dynamic")
      >>> v.shape, float(v[0]), float(v[127]), float(v[-1])
      ((255,), -1.0, 0.0, 1.0)
    """
    return _get_map(kind).values.copy()


def _get_map(kind: str) -> _Map:
    if kind not in _MAPS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    return _MAPS[kind]


def _encode(y: jax.Array, m: _Map) -> jax.Array:
    """Nearest code of normalized values y (in [-1, 1] or [0, 1]) as uint8 in [0, 254]."""
    if m.linear:
        if m.signed:
            c = jnp.round(y * 127.0) + 127.0
        else:
            c = jnp.round(y * 254.0)
        return jnp.clip(c, 0, 254).astype(jnp.uint8)
    # Branchless binary search: code = number of midpoints below y (ties go down).
    # (jnp.searchsorted fails under Explicit sharding in jax 0.10; this is 8 lookups.)
    mid = (m.values[:-1].astype(np.float64) + m.values[1:]) / 2.0
    mid = np.append(mid, np.inf).astype(np.float32)  # 255 entries
    pos = jnp.zeros(y.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        cand = pos + step
        pos = jnp.where(_lookup(mid, cand - 1) < y, cand, pos)
    return pos.astype(jnp.uint8)


def _table(m: _Map) -> np.ndarray:
    return np.append(m.values, np.float32(np.nan)).astype(np.float32)


def _explicit_sharding(x: jax.Array):
    return jax.typeof(x).sharding if sops.explicit_spec(x) is not None else None


def _lookup(table: np.ndarray, idx: jax.Array) -> jax.Array:
    """table[idx] for a small constant table (gives the gather its sharding when explicit)."""
    sharding = _explicit_sharding(idx)
    if sharding is None:
        return jnp.asarray(table)[idx]
    return jnp.asarray(table).at[idx].get(out_sharding=sharding)


def _last_axis_shards(x: jax.Array) -> int:
    """How many explicit shards the last axis of `x` has (1 in Auto mode / unsharded)."""
    spec = sops.explicit_spec(x)
    if spec is None or spec[-1] is None:
        return 1
    mesh = jax.typeof(x).sharding.mesh
    names = spec[-1] if isinstance(spec[-1], tuple) else (spec[-1],)
    return math.prod(mesh.shape[a] for a in names)


def _replicate_last(x: jax.Array) -> jax.Array:
    spec = sops.explicit_spec(x)
    if spec is None or spec[-1] is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh, P(*spec[:-1], None)))


def _local_last(x: jax.Array, nb: int, block: int) -> jax.Array:
    """`x`, with its last axis gathered if its explicit sharding cannot split into (nb, block).

    Blocks never straddle shards on other axes; on the last axis they line up
    with shards when num_blocks is a multiple of the shard count and no padding
    is needed (e.g. power-of-two dims). Otherwise (rare shapes) the last axis is
    all-gathered for the (cheap, elementwise) quantization math.
    """
    shards = _last_axis_shards(x)
    if shards == 1 or (nb * block == x.shape[-1] and nb % shards == 0):
        return x
    return _replicate_last(x)


def block_layout(n: int, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, int]:
    """(block, num_blocks) used along a last axis of length `n`.

    Rule: if `n` has a divisor in [block_size / 2, block_size] (or n <= block_size),
    the blocks are the largest divisor of n that is <= block_size, so blocks tile
    the axis exactly (any power-of-two block_size tiles power-of-two dims and
    shards of them). Otherwise num_blocks = ceil(n / block_size) blocks of
    ceil(n / num_blocks) values; the last one is shorter (padded internally, codes
    keep the value's shape). Dequantization recovers the layout from
    `scales.shape[-1]`: block = ceil(n / num_blocks).

    Args:
      n: length of the last axis (>= 1).
      block_size: nominal block size (>= 1).

    Returns:
      (block, num_blocks).

    Example:
      >>> from galore_jax._quantization import block_layout
      >>> block_layout(1024), block_layout(100), block_layout(768), block_layout(257)
      ((256, 4), (100, 1), (256, 3), (129, 2))
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if n < 1:
        raise ValueError(f"the last axis must have length >= 1 to be quantized, got {n}")
    if n <= block_size:
        return n, 1
    for d in range(block_size, (block_size + 1) // 2 - 1, -1):
        if d >= 1 and n % d == 0:
            return d, n // d
    nb = -(-n // block_size)
    return -(-n // nb), nb


def _to_blocks(x: jax.Array, block: int, nb: int) -> jax.Array:
    n = x.shape[-1]
    pad = block * nb - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], nb, block)


def _normalize(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    """blocks / absmax[..., None] (0 where absmax is 0), safe up to float32 max.

    XLA may turn x / s into x * (1 / s), and 1 / s is subnormal (flushed to 0)
    for s >= 2^126: such blocks are first scaled by the exact power 2^-64.
    """
    big = absmax >= 2.0**100
    c = jnp.where(big, jnp.asarray(2.0**-64, blocks.dtype), jnp.ones((), blocks.dtype))
    safe = jnp.where(absmax > 0, absmax, 1).astype(blocks.dtype) * c
    return (blocks * c[..., None]) / safe[..., None]


def _from_blocks(x: jax.Array, n: int) -> jax.Array:
    x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    return x[..., :n]


def _expand_scales(scales: jax.Array, n: int) -> jax.Array:
    nb = scales.shape[-1]
    block = -(-n // nb)
    scales = _local_last(scales, nb, 1) if nb * block == n else _replicate_last(scales)
    full = jnp.broadcast_to(scales[..., None], (*scales.shape, block))
    return full.reshape(*scales.shape[:-1], nb * block)[..., :n]


def _match_spec(x: jax.Array, like: jax.Array) -> jax.Array:
    """Gives `x` the explicit sharding of `like` on every axis whose length allows it."""
    spec = sops.explicit_spec(like)
    if spec is None:
        return x
    mesh = jax.typeof(like).sharding.mesh
    entries = []
    for size, entry in zip(x.shape, spec):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        entries.append(entry if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    target = tuple(entries)
    current = sops.explicit_spec(x) or (None,) * x.ndim
    if current == target:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P(*target)))


def _quantize_real(x: jax.Array, m: _Map, nb: Optional[int], block_size: int) -> QuantizedArray:
    n = x.shape[-1]
    if nb is None:
        block, nb = block_layout(n, block_size)
    else:
        block = -(-n // nb)
    y = _local_last(x.astype(jnp.promote_types(x.dtype, jnp.float32)), nb, block)
    if not m.signed:
        y = jnp.where((y < 0) & jnp.isfinite(y), jnp.zeros_like(y), y)  # -inf, NaN stay non-finite
    if m.sqrt:
        y = jnp.sqrt(y)
    blocks = _to_blocks(y, block, nb)
    finite = jnp.isfinite(blocks)
    absmax = jnp.max(jnp.where(finite, jnp.abs(blocks), 0), axis=-1)
    codes = _encode(_normalize(blocks, absmax), m)
    codes = jnp.where(finite, codes, jnp.uint8(NAN_CODE))
    codes = _match_spec(_from_blocks(codes, n), x)
    return QuantizedArray(codes, _match_spec(absmax.astype(jnp.float32), x))


@functools.partial(jax.jit, static_argnames=("kind", "block_size"))
def quantize(
    x: jax.Array, *, kind: str, block_size: int = DEFAULT_BLOCK_SIZE
) -> Union[QuantizedArray, QuantizedComplex]:
    """Block-wise 8-bit quantization along the last axis (absmax scaling, nearest code).

    Each block (see `block_layout`) is divided by its largest finite magnitude
    (the float32 scale) and every value is replaced by the nearest entry of the
    map `kind` (see the module docstring; `MU_KIND` / `NU_KIND` are what
    `scale_by_adam_8bit` uses). Unsigned maps clamp negative inputs to 0.

    Special values: non-finite inputs (NaN, +-inf) get the reserved code 255 and
    dequantize to NaN; they are left out of their block's scale, so the rest of
    the block is unaffected. An all-zero block has scale 0 and dequantizes to
    zeros. Values below the map's smallest step relative to their block's
    maximum (about 1e-6 of it for the dynamic maps, 1/254 for the linear ones)
    round to 0. Float32 subnormals may be flushed to zero by XLA.

    Args:
      x: real or complex array with at least one axis (complex: real and
        imaginary parts are quantized separately, giving a `QuantizedComplex`).
      kind: one of `KINDS`.
      block_size: nominal block size along the last axis.

    Returns:
      `QuantizedArray(codes, scales)` (or `QuantizedComplex`); jittable, shapes static.

    Example:
      >>> import numpy as np
      >>> from galore_jax import _quantization as q
      >>> x = np.linspace(-1.0, 1.0, 512, dtype=np.float32).reshape(2, 256)
      >>> qx = q.quantize(x, kind=q.MU_KIND)
      >>> qx.codes.shape, qx.codes.dtype, qx.scales.shape
      ((2, 256), dtype('uint8'), (2, 1))
      >>> bool(np.abs(np.asarray(q.dequantize(qx, kind=q.MU_KIND)) - x).max() < 0.02)
      True
    """
    return _quantize(x, kind, None, block_size)


def _quantize(x, kind, nb, block_size):
    m = _get_map(kind)
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"quantize needs an array with at least one axis, got shape {x.shape}")
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        nbr = None if nb is None else nb[0]
        nbi = None if nb is None else nb[1]
        return QuantizedComplex(
            _quantize_real(jnp.real(x), m, nbr, block_size),
            _quantize_real(jnp.imag(x), m, nbi, block_size),
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize needs a float or complex array, got dtype {x.dtype}")
    return _quantize_real(x, m, nb, block_size)


@functools.partial(jax.jit, static_argnames=("kind",))
def quantize_like(x: jax.Array, like, *, kind: str):
    """Quantizes `x` into the same layout as `like` (same block count); plain `like`: cast.

    For requantizing a moment after changing it in full precision (e.g. rotating
    it into a new GaLore basis): `like` is the stored leaf, a `QuantizedArray`,
    `QuantizedComplex` or a plain array (small leaves), and the result has the
    same structure, shapes and dtypes.

    Example:
      >>> import numpy as np
      >>> from galore_jax import _quantization as q
      >>> old = q.quantize(np.ones((4, 300), np.float32), kind=q.NU_KIND, block_size=64)
      >>> new = q.quantize_like(np.full((4, 300), 2.0, np.float32), old, kind=q.NU_KIND)
      >>> new.scales.shape, old.scales.shape  # 300 in blocks of 60, as `old`
      ((4, 5), (4, 5))
      >>> round(float(np.asarray(q.dequantize(new, kind=q.NU_KIND))[0, 0]), 5)
      2.0
    """
    like = as_quantized(like)
    if isinstance(like, QuantizedComplex):
        nb = (like.real.scales.shape[-1], like.imag.scales.shape[-1])
        return _quantize(jnp.asarray(x), kind, nb, 0)
    if isinstance(like, QuantizedArray):
        if jnp.shape(x) != like.codes.shape:
            raise ValueError(
                f"quantize_like: x has shape {jnp.shape(x)}, like has {like.codes.shape}"
            )
        return _quantize(x, kind, like.scales.shape[-1], 0)
    return jnp.asarray(x).astype(jnp.result_type(like))


@functools.partial(jax.jit, static_argnames=("kind", "dtype"))
def dequantize(q, *, kind: str, dtype: Optional[Any] = None) -> jax.Array:
    """Inverse of `quantize` (up to rounding): codes -> table value * block scale.

    Args:
      q: a `QuantizedArray`, `QuantizedComplex`, or a plain array (returned cast
        to `dtype`, so callers can treat quantized and full-precision leaves alike).
      kind: the map `q` was quantized with.
      dtype: result dtype; default float32 (complex64 for `QuantizedComplex`,
        the array's own dtype for a plain array).

    Returns:
      An array of the original shape.
    """
    q = as_quantized(q)
    m = _get_map(kind)
    if isinstance(q, QuantizedComplex):
        dtype = jnp.complex64 if dtype is None else dtype
        re = _dequantize_real(q.real, m)
        im = _dequantize_real(q.imag, m)
        return jax.lax.complex(re, im).astype(dtype)
    if isinstance(q, QuantizedArray):
        return _dequantize_real(q, m).astype(jnp.float32 if dtype is None else dtype)
    q = jnp.asarray(q)
    return q if dtype is None else q.astype(dtype)


def _dequantize_real(q: QuantizedArray, m: _Map) -> jax.Array:
    n = q.codes.shape[-1]
    nb = q.scales.shape[-1]
    codes = _local_last(q.codes, nb, -(-n // nb))
    y = _lookup(_table(m), codes.astype(jnp.int32))
    y = y * _match_spec(_expand_scales(q.scales, n), y)
    y = y * y if m.sqrt else y
    return _match_spec(y, q.codes)

"""Tensors: mode unfolding, mode products, Tucker projection and HOSVD."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops
from galore_jax.linalg._qr import compute_dtype
from galore_jax.linalg._svd import top_left_basis


def mode_unfold(t: jax.Array, mode: int) -> jax.Array:
    """Mode-`mode` unfolding: (d_mode, prod of the other dims), other dims in order."""
    return jnp.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def mode_fold(matrix: jax.Array, mode: int, shape: Sequence[int]) -> jax.Array:
    """Inverse of `mode_unfold` for a tensor of the given shape."""
    moved = (shape[mode],) + tuple(d for i, d in enumerate(shape) if i != mode)
    return jnp.moveaxis(matrix.reshape(moved), 0, mode)


def mode_product(t: jax.Array, matrix: jax.Array, mode: int) -> jax.Array:
    """Mode-`mode` product t x_mode matrix: contracts t's axis `mode` with matrix's columns.

    `matrix` has shape (new_dim, t.shape[mode]); the result has new_dim at `mode`.
    """
    out = jnp.tensordot(matrix, t, axes=([1], [mode]))
    return jnp.moveaxis(out, 0, mode)


def tucker_project(t: jax.Array, factors: Sequence[Optional[jax.Array]]) -> jax.Array:
    """Core = t x_k U_k^H for every mode k whose factor is not None."""
    core = t
    for mode, factor in enumerate(factors):
        if factor is not None:
            core = mode_product(core, jnp.conj(factor).T.astype(core.dtype), mode)
    return core


def tucker_reconstruct(core: jax.Array, factors: Sequence[Optional[jax.Array]]) -> jax.Array:
    """t = core x_k U_k for every mode k whose factor is not None."""
    t = core
    for mode, factor in enumerate(factors):
        if factor is not None:
            t = mode_product(t, factor.astype(t.dtype), mode)
    return t


def hosvd(
    t: jax.Array,
    ranks: Union[int, Sequence[Optional[int]]],
    *,
    key: Optional[jax.Array] = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 1,
    init: Optional[Sequence[Optional[jax.Array]]] = None,
):
    """Truncated higher-order SVD (Tucker decomposition) of a real or complex tensor.

    Factor k holds the top `ranks[k]` left singular vectors of the mode-k
    unfolding (sign-canonical); the core is `t` projected on all factors with
    conjugate transposes. A rank of None leaves that mode unprojected.

    Args:
      t: N-D array (float or complex).
      ranks: one int for every mode, or a per-mode sequence of int or None.
      key: PRNG key (needed for svd="randomized").
      svd: "exact" or "randomized" per-mode SVD.
      oversample, power_iters: randomized range-finder settings.
      init: previous factors (per mode, or None) to warm-start the randomized path.

    Returns:
      `(core, factors)`: core of shape (r_0, ..., r_{N-1}) and a list of
      (d_k, r_k) factors (None for unprojected modes), float32 / complex64.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import galore_jax as gj
      >>> t = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 4))
      >>> core, factors = gj.hosvd(t, (3, 2, 2))
      >>> core.shape, [f.shape for f in factors]
      ((3, 2, 2), [(6, 3), (5, 2), (4, 2)])
    """
    if isinstance(ranks, int):
        ranks = (ranks,) * t.ndim
    ranks = tuple(ranks)
    if len(ranks) != t.ndim:
        raise ValueError(f"ranks has {len(ranks)} entries but the tensor has {t.ndim} modes")
    t = sops.replicate(t.astype(compute_dtype(t.dtype)))
    keys = jax.random.split(key, t.ndim) if key is not None else [None] * t.ndim
    factors = []
    for mode, r in enumerate(ranks):
        if r is None:
            factors.append(None)
            continue
        unfolding = mode_unfold(t, mode)
        if r > unfolding.shape[0]:
            raise ValueError(f"ranks[{mode}]={r} exceeds the mode's size {unfolding.shape[0]}")
        if r > unfolding.shape[1]:
            raise ValueError(
                f"ranks[{mode}]={r} exceeds the product of the other modes {unfolding.shape[1]}"
            )
        prev = None if init is None else init[mode]
        factors.append(
            top_left_basis(
                unfolding,
                r,
                svd=svd,
                key=keys[mode],
                oversample=oversample,
                power_iters=power_iters,
                init=prev,
            )
        )
    return tucker_project(t, factors), factors

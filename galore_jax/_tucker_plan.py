"""Tensor-GaLore's per-leaf Tucker plan and the pure functions that use it.

One (d_k, r_k) factor per projected mode; the core G x_k U_k^H is what the base
optimizer sees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops
from galore_jax._matrix_plan import resolve_rank
from galore_jax.linalg import hosvd, mode_product, tucker_reconstruct
from galore_jax.linalg import tucker_project as project_core
from galore_jax.linalg._qr import compute_dtype
from galore_jax.options import RandomizedSVD, Refresh


@dataclasses.dataclass(frozen=True)
class TuckerPlan:
    """Per-mode Tucker projection of one N-D leaf (static)."""

    shape: Tuple[int, ...]
    ranks: Tuple[Optional[int], ...]  # None: mode not projected

    def factor_shapes(self):
        return tuple((d, r) for d, r in zip(self.shape, self.ranks) if r is not None)

    def core_shape(self):
        return tuple(d if r is None else r for d, r in zip(self.shape, self.ranks))

    def expand(self, factors: tuple) -> list:
        """Per-mode list with None for unprojected modes."""
        it = iter(factors)
        return [None if r is None else next(it) for r in self.ranks]


def tucker_ranks_for_fraction(shape, fraction: float, modes=None) -> Tuple[int, ...]:
    """Per-mode Tucker ranks holding about `fraction` of a tensor's entries.

    tensorly's (and neuraloperator's Tensor-GaLore) meaning of a float Tucker rank:
    every projected mode k gets rank round(c * d_k) (at least 1, at most d_k and
    the other modes' product), with c chosen so that the core plus the factors hold
    `fraction` times the tensor's entries. Modes not in `modes` keep their size.

    Example:
      >>> from galore_jax._tucker_plan import tucker_ranks_for_fraction
      >>> tucker_ranks_for_fraction((24, 24, 8, 8), 0.25)
      (17, 17, 6, 6)
    """
    shape = tuple(int(d) for d in shape)
    chosen = set(range(len(shape))) if modes is None else {m % len(shape) for m in modes}
    size = math.prod(shape)
    kept = math.prod(d for k, d in enumerate(shape) if k not in chosen)
    projected = [d for k, d in enumerate(shape) if k in chosen]
    squares = sum(d * d for d in projected)

    def excess(c):  # core + factors - the budget; increases with c
        return kept * math.prod(projected) * c ** len(projected) + squares * c - fraction * size

    lo, hi = 0.0, max(fraction, 1.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    c = (lo + hi) / 2
    return tuple(
        d if k not in chosen else min(d, size // d, max(1, int(round(c * d))))
        for k, d in enumerate(shape)
    )


def tucker_plan(shape, rank, modes: Optional[Sequence[int]], path: str) -> TuckerPlan:
    """The Tucker ranks of one leaf; errors name the leaf, its shape and the fix.

    rank: an int for every projected mode, a float fraction of the tensor's entries
    (`tucker_ranks_for_fraction`), or a per-mode tuple (int, float fraction of that
    mode, or None to leave the mode unprojected).
    """
    ndim = len(shape)
    chosen = tuple(range(ndim)) if modes is None else tuple(m % ndim for m in modes)
    if isinstance(rank, (tuple, list)):
        if len(rank) != ndim:
            raise ValueError(
                f"rank {tuple(rank)!r} has {len(rank)} entries but '{path}' has {ndim} modes "
                f"(shape {tuple(shape)}); give one rank per mode (None to skip a mode)"
            )
        per_mode = tuple(rank)
    elif isinstance(rank, float):
        per_mode = tucker_ranks_for_fraction(shape, rank, chosen)
    else:
        per_mode = (rank,) * ndim
    ranks = []
    for mode, (d, r) in enumerate(zip(shape, per_mode)):
        if mode not in chosen or r is None:
            ranks.append(None)
            continue
        rr = resolve_rank(r, d)
        other = math.prod(shape) // d
        if rr > d or rr > other:
            raise ValueError(
                f"rank {r!r} gives {rr} for mode {mode} of '{path}' (shape {tuple(shape)}), "
                f"larger than the mode size {d} or the other modes' product {other}; use at "
                f"most {min(d, other)} there, a float fraction of the entries, or label this "
                "leaf for plain Adam"
            )
        ranks.append(rr)
    return TuckerPlan(tuple(shape), tuple(ranks))


def tucker_refresh(
    plan: TuckerPlan, g: jax.Array, old: tuple, *, refresh: Refresh, key, warm: bool
):
    """New factors from gradient `g` (HOSVD), in `old`'s dtypes and shardings."""
    init = plan.expand(old) if warm else None
    if isinstance(refresh, RandomizedSVD):
        options = dict(
            svd="randomized", oversample=refresh.oversample, power_iters=refresh.power_iters
        )
    else:
        options = dict(svd="exact")
    _, factors = hosvd(g, plan.ranks, key=key, init=init, **options)
    new = tuple(f for f in factors if f is not None)
    return tuple(sops.match_sharding(f.astype(o.dtype), o) for f, o in zip(new, old))


def tucker_project(plan: TuckerPlan, g: jax.Array, factors: tuple) -> jax.Array:
    g = g.astype(compute_dtype(g.dtype))
    return project_core(sops.replicate(g), plan.expand(factors))


def tucker_project_back(plan: TuckerPlan, core: jax.Array, factors: tuple) -> jax.Array:
    return tucker_reconstruct(core, plan.expand(factors))


def tucker_rotate_moment(plan: TuckerPlan, moment, old: tuple, new: tuple, *, second: bool):
    """Rotates a Tucker core moment: mode k by U_new_k^H U_old_k (squared for second moments)."""
    x = moment.astype(compute_dtype(moment.dtype))
    for mode, (o, n) in enumerate(zip(plan.expand(old), plan.expand(new))):
        if o is None:
            continue
        rot = jnp.conj(n).T.astype(x.dtype) @ o.astype(x.dtype)
        if second:
            rot = (jnp.abs(rot) ** 2).astype(x.dtype)
        x = mode_product(x, rot, mode)
    return x.astype(moment.dtype)

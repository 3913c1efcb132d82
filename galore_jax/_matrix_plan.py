"""Matrix GaLore's per-leaf plan and the pure functions that use it.

A plan is static (decided from the leaf's shape at trace time); the projector
arrays it describes live in the optimizer state. Gradients are brought to a
standard layout `(*batch, m, n)`; projectors are stored in that layout with the
param's axis order kept, so each stored axis lines up with the param axis it
came from (that is what lets `galore_jax.sharding` derive the state's shardings):
    left:  U  (*batch, m, r),  low-rank gradient U^H G        (*batch, r, n)
    right: Vh (*batch, r, n),  low-rank gradient G Vh^H       (*batch, m, r)
    full:  U and Vh,           low-rank gradient U^H G Vh^H   (*batch, r, r)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops
from galore_jax.dimensions import DimensionNumbers
from galore_jax.linalg._qr import compute_dtype
from galore_jax.linalg._svd import top_left_bases
from galore_jax.options import RandomizedSVD, Refresh


def resolve_rank(rank, dim: int, *, name: str = "rank") -> int:
    """int rank as is; float in (0, 1] as a fraction of `dim` (rounded, >= 1)."""
    if isinstance(rank, float):
        return max(1, int(round(rank * dim)))
    return int(rank)


@dataclasses.dataclass(frozen=True)
class MatrixPlan:
    """How one leaf is projected by matrix GaLore (all fields static)."""

    shape: Tuple[int, ...]
    batch_axes: Tuple[int, ...]
    flatten: bool  # N-D leaf without batch axes: reshaped to (d0, prod(rest))
    side: str  # left | right | full
    rank: int

    @property
    def batch_shape(self):
        return tuple(self.shape[a] for a in self.batch_axes)

    @property
    def matrix_shape(self):
        if self.flatten:
            return (self.shape[0], math.prod(self.shape[1:]))
        rest = [d for i, d in enumerate(self.shape) if i not in self.batch_axes]
        return tuple(rest)

    def to_standard(self, x: jax.Array) -> jax.Array:
        if self.flatten:
            return x.reshape(self.matrix_shape)
        return sops.moveaxes_to_front(x, self.batch_axes)

    def from_standard(self, x: jax.Array) -> jax.Array:
        if self.flatten:
            return x.reshape(self.shape)
        if not self.batch_axes:
            return x
        return jnp.moveaxis(x, tuple(range(len(self.batch_axes))), self.batch_axes)

    def projector_shapes(self):
        m, n = self.matrix_shape
        b, r = self.batch_shape, self.rank
        shapes = []
        if self.side in ("left", "full"):
            shapes.append((*b, m, r))
        if self.side in ("right", "full"):
            shapes.append((*b, r, n))
        return tuple(shapes)

    def low_rank_shape(self):
        m, n = self.matrix_shape
        b, r = self.batch_shape, self.rank
        return {"left": (*b, r, n), "right": (*b, m, r), "full": (*b, r, r)}[self.side]


def _matrix_layout(shape, dims: Optional[DimensionNumbers], path: str):
    """(batch_axes, flatten) of a leaf; errors name the leaf."""
    ndim = len(shape)
    if dims is None:
        return (), ndim > 2
    batch_axes = tuple(sorted(a % ndim if -ndim <= a < ndim else a for a in dims.batch_axes))
    if any(not 0 <= a < ndim for a in batch_axes) or len(set(batch_axes)) != len(batch_axes):
        raise ValueError(
            f"dimension_numbers for '{path}' has batch_axes {dims.batch_axes}, which are not "
            f"distinct axes of a leaf of shape {shape}"
        )
    if ndim - len(batch_axes) != 2:
        raise ValueError(
            f"dimension_numbers for '{path}' leave {ndim - len(batch_axes)} matrix axes for a leaf "
            f"of shape {shape} with batch_axes {batch_axes}; exactly 2 must remain"
        )
    return batch_axes, False


def _side_and_rank(matrix_shape, proj_type: str, rank):
    m, n = matrix_shape
    side = {
        "std": "right" if m >= n else "left",
        "reverse_std": "left" if m >= n else "right",
        "left": "left",
        "right": "right",
        "full": "full",
    }[proj_type]
    projected_dim = {"left": m, "right": n, "full": min(m, n)}[side]
    return side, resolve_rank(rank, projected_dim)


def matrix_plan(
    shape, dims: Optional[DimensionNumbers], proj_type: str, rank, path: str
) -> MatrixPlan:
    """Builds (and validates) the plan for one leaf; errors name the leaf."""
    batch_axes, flatten = _matrix_layout(shape, dims, path)
    plan = MatrixPlan(tuple(shape), batch_axes, flatten, "left", 1)
    m, n = plan.matrix_shape
    side, r = _side_and_rank((m, n), proj_type, rank)
    if r > min(m, n):
        raise ValueError(
            f"rank={rank!r} gives {r} for '{path}' (matrix {m}x{n}), larger than its smaller "
            f"dimension {min(m, n)}; use a smaller rank, a fraction, or label this leaf for "
            "plain Adam"
        )
    return dataclasses.replace(plan, side=side, rank=r)


def saves_memory(shape, dims: Optional[DimensionNumbers], proj_type: str, rank) -> bool:
    """Whether matrix GaLore at `rank` keeps less state than Adam does for the matrix:
    its projector(s) plus two low-rank moments against two full-size moments (so
    rank < min(m, n), and for a square matrix about rank < 2/3 of its side)."""
    batch_axes, flatten = _matrix_layout(shape, dims, "")
    m, n = MatrixPlan(tuple(shape), batch_axes, flatten, "left", 1).matrix_shape
    side, r = _side_and_rank((m, n), proj_type, rank)
    if r >= min(m, n):
        return False
    plan = MatrixPlan(tuple(shape), batch_axes, flatten, side, r)
    kept = sum(math.prod(s) for s in plan.projector_shapes()) + 2 * math.prod(plan.low_rank_shape())
    return kept < 2 * math.prod(shape)


def init_projectors(plan: MatrixPlan, dtype) -> tuple:
    return tuple(jnp.zeros(s, dtype) for s in plan.projector_shapes())


def project(plan: MatrixPlan, g: jax.Array, projectors: tuple) -> jax.Array:
    """Low-rank gradient (standard layout in, standard layout out)."""
    f32 = compute_dtype(g.dtype)
    if plan.side == "left":
        (u,) = projectors
        return sops.einsum("...mr,...mn->...rn", jnp.conj(u), g, preferred_element_type=f32)
    if plan.side == "right":
        (vh,) = projectors
        return sops.einsum("...mn,...rn->...mr", g, jnp.conj(vh), preferred_element_type=f32)
    u, vh = projectors
    left = sops.einsum("...mr,...mn->...rn", jnp.conj(u), g, preferred_element_type=f32)
    return sops.einsum("...rn,...sn->...rs", left, jnp.conj(vh).astype(f32))


def project_back(
    plan: MatrixPlan, low: jax.Array, projectors: tuple, dtype: Optional[jnp.dtype] = None
) -> jax.Array:
    """Full-size update (standard layout) from the low-rank one, in `dtype` (None:
    low's float32 / complex64 compute dtype).

    A 16-bit `dtype` (bf16 / f16 params) makes the GEMM a 16-bit one: operands in
    `dtype`, result written in `dtype` (accumulated in float32 by XLA's GPU / TPU
    GEMMs), so no float32 full-size array is written and then converted.
    """
    f32 = compute_dtype(low.dtype)
    narrow = dtype is not None and jnp.dtype(dtype) != compute_dtype(dtype)
    out = jnp.dtype(dtype) if narrow else f32
    if plan.side == "full":  # the inner product stays in f32; the outer writes the update
        u, vh = projectors
        low = sops.einsum("...mr,...rs->...ms", u, low, preferred_element_type=f32)
        projectors = (vh if narrow else vh.astype(f32),)
    (p,) = projectors
    a, b = (p, low) if plan.side == "left" else (low, p)
    if narrow:
        a, b = a.astype(out), b.astype(out)
    return sops.einsum("...mr,...rn->...mn", a, b, preferred_element_type=out)


def refresh_kwargs(refresh: Refresh) -> dict:
    """`linalg.top_left_bases`' keyword arguments for a refresh object."""
    if isinstance(refresh, RandomizedSVD):
        return dict(
            svd="randomized",
            oversample=refresh.oversample,
            power_iters=refresh.power_iters,
            intermediate_passes=refresh.passes,
            eigh_implementation=refresh.eigh,
        )
    return dict(svd="exact", oversample=0, power_iters=0)


class RefreshTask(NamedTuple):
    """One side of one leaf's refresh: the matrix is the leaf's standard-layout
    gradient g (`adjoint` False: its left basis, U) or g^H (True: the right, Vh^H)."""

    leaf: int
    adjoint: bool
    rank: int
    key: jax.Array
    init: Optional[jax.Array]  # the old basis (warm start), else None


def refresh_tasks(plans: list, olds: list, *, keys: list, warm: bool) -> tuple:
    """(tasks, sides): the factorisations the leaves' refresh needs, and per leaf the
    indices of its tasks (left side first)."""
    tasks, sides = [], []
    for i, (plan, old, key) in enumerate(zip(plans, olds, keys)):
        left_key, right_key = jax.random.split(key)
        mine = []
        if plan.side in ("left", "full"):
            mine.append(len(tasks))
            tasks.append(RefreshTask(i, False, plan.rank, left_key, old[0] if warm else None))
        if plan.side in ("right", "full"):
            mine.append(len(tasks))
            init = sops.swap_last(old[-1]) if warm else None
            tasks.append(RefreshTask(i, True, plan.rank, right_key, init))
        sides.append(mine)
    return tasks, sides


def projectors_from_bases(plans: list, sides: list, bases: list, olds: list) -> list:
    """Per leaf, its new projectors from its tasks' bases, in `olds`' dtypes and shardings."""
    out = []
    for plan, mine, old in zip(plans, sides, olds):
        new = [bases[j] for j in mine]
        if plan.side in ("right", "full"):
            new[-1] = sops.swap_last(new[-1])
        out.append(tuple(sops.match_sharding(p.astype(o.dtype), o) for p, o in zip(new, old)))
    return out


def refresh_projectors(
    plans: list,
    gs: list,
    olds: list,
    *,
    refresh: Refresh,
    keys: list,
    warm: bool,
    valid: Optional[list] = None,
) -> list:
    """New projectors of several leaves from their gradients `gs` (standard layout), in
    `olds`' dtypes and shardings. Leaves refreshed at one step share each batched
    factorisation call (`linalg.top_left_bases`). `valid` (a boolean scalar per
    leaf): where False, the leaf is refreshed as a zero gradient."""
    tasks, sides = refresh_tasks(plans, olds, keys=keys, warm=warm)
    valid = [None] * len(plans) if valid is None else valid
    bases = top_left_bases(
        [
            (sops.swap_last(gs[t.leaf]) if t.adjoint else gs[t.leaf], t.rank, t.key, t.init)
            for t in tasks
        ],
        **refresh_kwargs(refresh),
        valid=[valid[t.leaf] for t in tasks],
    )
    return projectors_from_bases(plans, sides, bases, olds)


def rotation(plan: MatrixPlan, old: tuple, new: tuple):
    """Maps old low-rank coordinates to new ones: (left_rot, right_rot), either None.

    Left side:  R = U_new^H U_old, new moment R @ M.
    Right side: C = Vh_old Vh_new^H, new moment M @ C.
    """
    f32 = compute_dtype(old[0].dtype)
    left = right = None
    if plan.side in ("left", "full"):
        left = sops.einsum(
            "...mr,...ms->...rs", jnp.conj(new[0]), old[0], preferred_element_type=f32
        )
    if plan.side in ("right", "full"):
        right = sops.einsum(
            "...rn,...sn->...rs", old[-1], jnp.conj(new[-1]), preferred_element_type=f32
        )
    return left, right


def rotate_moment(moment: jax.Array, rotations, *, second: bool) -> jax.Array:
    """Rotates a low-rank moment into the new basis.

    First moments are linear in the gradient and rotate exactly. Second moments
    are per-coordinate magnitudes that do not rotate; they are mapped with the
    elementwise-squared rotation (v_new_i = sum_j |R_ij|^2 v_old_j), which is exact
    when the old coordinates are uncorrelated and preserves the overall scale.
    """
    left, right = rotations
    x = moment.astype(compute_dtype(moment.dtype))
    if second:
        left = None if left is None else jnp.abs(left) ** 2
        right = None if right is None else jnp.abs(right) ** 2
    if left is not None:
        x = sops.einsum("...rs,...sn->...rn", left.astype(x.dtype), x)
    if right is not None:
        x = sops.einsum("...ms,...sr->...mr", x, right.astype(x.dtype))
    return x.astype(moment.dtype)

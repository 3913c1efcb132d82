"""Per-leaf projection plans and the pure functions that use them.

A plan is static (decided from the leaf's shape at trace time); the projector
arrays it describes live in the optimizer state. Two kinds:

* `MatrixPlan`: GaLore on a matrix or a batch of matrices (stacked layers).
  Gradients are brought to a standard layout `(*batch, m, n)`; projectors are
  stored in that layout with the param's axis order kept, so each stored axis
  lines up with the param axis it came from (that is what lets
  `galore_jax.sharding` derive the state's shardings):
    left:  U  (*batch, m, r),  low-rank gradient U^H G        (*batch, r, n)
    right: Vh (*batch, r, n),  low-rank gradient G Vh^H       (*batch, m, r)
    full:  U and Vh,           low-rank gradient U^H G Vh^H   (*batch, r, r)
* `TuckerPlan`: Tensor-GaLore on an N-D tensor. One (d_k, r_k) factor per
  projected mode; the core G x_k U_k^H is what the base optimizer sees.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops
from galore_jax import linalg, paths

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")
ON_REFRESH = ("keep", "reset", "project")


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
    """Which axes of a leaf are batch axes (e.g. the layer axis of stacked weights).

    The two remaining axes are the matrix (rows, columns); each batch element
    gets its own projector. Give one per leaf in a pytree matching the params
    (None for the default), one for all leaves, or a callable params -> pytree.

    Example:
      >>> import galore_jax as gj
      >>> gj.DimensionNumbers(batch_axes=(0,)).batch_axes
      (0,)
    """

    batch_axes: Tuple[int, ...] = ()

    def __post_init__(self):
        axes = self.batch_axes
        if isinstance(axes, int):
            axes = (axes,)
        object.__setattr__(self, "batch_axes", tuple(int(a) for a in axes))


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


def infer_dimension_numbers(params) -> list:
    """Per-leaf DimensionNumbers for stacked layers found by structure (None elsewhere).

    A size L is a stack (layer) axis when it leads a 3-D leaf and at least one more
    leaf, and never appears as a non-leading dimension of any leaf with 2 or more
    axes: scanned
    layers stack (L, m, n) kernels and (L, d) norm scales and biases on a leading
    axis that no feature dimension shares. FNO spectral weights (c, c, k) or conv
    kernels (k, c_in, c_out) whose leading size is also a feature size are not
    stacks. Leaves (L, m, n) become L matrices; (L, d) become L vectors.
    """
    shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(params)]
    inner = {d for s in shapes if len(s) >= 2 for d in s[1:]}
    leading = collections.Counter(s[0] for s in shapes if len(s) >= 2)
    stacks = {s[0] for s in shapes if len(s) == 3 and s[0] not in inner and leading[s[0]] >= 2}
    return [DimensionNumbers((0,)) if len(s) in (2, 3) and s[0] in stacks else None for s in shapes]


def _is_dims_leaf(x):
    return x is None or isinstance(x, DimensionNumbers)


def resolve_dimension_numbers(dimension_numbers, params) -> list:
    """Per-leaf DimensionNumbers (or None), from any accepted form; clear errors.

    None infers stacked layers by structure (`infer_dimension_numbers`). A pytree
    is matched to the params by key path, so it also fits the masked sub-trees
    that `optax.partition` hands to an inner transform.
    """
    keypaths = jax.tree_util.tree_flatten_with_path(params)[0]
    if dimension_numbers is None:
        return infer_dimension_numbers(params)
    if isinstance(dimension_numbers, DimensionNumbers):
        n = 2 + len(dimension_numbers.batch_axes)
        return [dimension_numbers if jnp.ndim(x) == n else None for _, x in keypaths]
    tree = dimension_numbers(params) if paths.is_function(dimension_numbers) else dimension_numbers
    by_path = {
        paths.path_string(kp): d
        for kp, d in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_dims_leaf)[0]
    }
    per_leaf = []
    for keypath, _ in keypaths:
        name = paths.path_string(keypath)
        if name not in by_path:
            raise ValueError(
                "dimension_numbers does not match the params' structure: no entry for "
                f"'{name}'. Give a pytree with the params' structure holding DimensionNumbers or "
                "None at each leaf, one DimensionNumbers for all leaves, or a callable params -> "
                "such a pytree"
            )
        d = by_path[name]
        if d is not None and not isinstance(d, DimensionNumbers):
            raise TypeError(
                f"dimension_numbers entries must be DimensionNumbers or None, got {d!r}"
            )
        per_leaf.append(d)
    return per_leaf


def init_projectors(plan: MatrixPlan, dtype) -> tuple:
    return tuple(jnp.zeros(s, dtype) for s in plan.projector_shapes())


def project(plan: MatrixPlan, g: jax.Array, projectors: tuple) -> jax.Array:
    """Low-rank gradient (standard layout in, standard layout out)."""
    f32 = linalg.compute_dtype(g.dtype)
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
    f32 = linalg.compute_dtype(low.dtype)
    narrow = dtype is not None and jnp.dtype(dtype) != linalg.compute_dtype(dtype)
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


def refresh_projectors(
    plan: MatrixPlan,
    g: jax.Array,
    old: tuple,
    *,
    svd: str,
    key,
    oversample: int,
    power_iters: int,
    warm: bool,
    intermediate_passes: int = 2,
    eigh_implementation: Optional[str] = None,
) -> tuple:
    """New projectors from gradient `g` (standard layout), in `old`'s dtype and sharding."""
    return refresh_projectors_together(
        [plan],
        [g],
        [old],
        svd=svd,
        keys=[key],
        oversample=oversample,
        power_iters=power_iters,
        warm=warm,
        intermediate_passes=intermediate_passes,
        eigh_implementation=eigh_implementation,
    )[0]


def refresh_projectors_together(
    plans: list,
    gs: list,
    olds: list,
    *,
    svd: str,
    keys: list,
    oversample: int,
    power_iters: int,
    warm: bool,
    intermediate_passes: int = 2,
    eigh_implementation: Optional[str] = None,
    valid: Optional[list] = None,
) -> list:
    """`refresh_projectors` of several leaves refreshed at one step: their SVDs share
    each batched factorisation call (`linalg.top_left_bases`). `valid` (a boolean
    scalar per leaf): where False, the leaf is refreshed as a zero gradient."""
    tasks, slots = [], []  # slots[i]: indices into tasks of leaf i's sides
    task_valid = []
    valid = [None] * len(plans) if valid is None else valid
    for plan, g, old, key, v in zip(plans, gs, olds, keys, valid):
        left_key, right_key = jax.random.split(key)
        sides = []
        if plan.side in ("left", "full"):
            sides.append(len(tasks))
            tasks.append((g, plan.rank, left_key, old[0] if warm else None))
        if plan.side in ("right", "full"):
            sides.append(len(tasks))
            init = sops.swap_last(old[-1]) if warm else None
            tasks.append((sops.swap_last(g), plan.rank, right_key, init))
        task_valid += [v] * len(sides)
        slots.append((plan.side, sides))
    bases = linalg.top_left_bases(
        tasks,
        svd=svd,
        oversample=oversample,
        power_iters=power_iters,
        intermediate_passes=intermediate_passes,
        eigh_implementation=eigh_implementation,
        valid=task_valid,
    )
    out = []
    for (side, sides), old in zip(slots, olds):
        new = [bases[j] for j in sides]
        if side in ("right", "full"):
            new[-1] = sops.swap_last(new[-1])
        out.append(tuple(sops.match_sharding(p.astype(o.dtype), o) for p, o in zip(new, old)))
    return out


def rotation(plan: MatrixPlan, old: tuple, new: tuple):
    """Maps old low-rank coordinates to new ones: (left_rot, right_rot), either None.

    Left side:  R = U_new^H U_old, new moment R @ M.
    Right side: C = Vh_old Vh_new^H, new moment M @ C.
    """
    f32 = linalg.compute_dtype(old[0].dtype)
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
    x = moment.astype(linalg.compute_dtype(moment.dtype))
    if second:
        left = None if left is None else jnp.abs(left) ** 2
        right = None if right is None else jnp.abs(right) ** 2
    if left is not None:
        x = sops.einsum("...rs,...sn->...rn", left.astype(x.dtype), x)
    if right is not None:
        x = sops.einsum("...ms,...sr->...mr", x, right.astype(x.dtype))
    return x.astype(moment.dtype)


# ----------------------------------------------------------------------------
# Tucker (Tensor-GaLore)
# ----------------------------------------------------------------------------


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
      >>> from galore_jax.projection import tucker_ranks_for_fraction
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
    plan: TuckerPlan, g: jax.Array, old: tuple, *, svd, key, oversample, power_iters, warm: bool
) -> tuple:
    init = plan.expand(old) if warm else None
    ranks = plan.ranks
    _, factors = linalg.hosvd(
        g, ranks, key=key, svd=svd, oversample=oversample, power_iters=power_iters, init=init
    )
    new = tuple(f for f in factors if f is not None)
    return tuple(sops.match_sharding(f.astype(o.dtype), o) for f, o in zip(new, old))


def tucker_project(plan: TuckerPlan, g: jax.Array, factors: tuple) -> jax.Array:
    g = g.astype(linalg.compute_dtype(g.dtype))
    return linalg.tucker_project(sops.replicate(g), plan.expand(factors))


def tucker_project_back(plan: TuckerPlan, core: jax.Array, factors: tuple) -> jax.Array:
    return linalg.tucker_reconstruct(core, plan.expand(factors))


def tucker_rotate_moment(plan: TuckerPlan, moment, old: tuple, new: tuple, *, second: bool):
    """Rotates a Tucker core moment: mode k by U_new_k^H U_old_k (squared for second moments)."""
    x = moment.astype(linalg.compute_dtype(moment.dtype))
    for mode, (o, n) in enumerate(zip(plan.expand(old), plan.expand(new))):
        if o is None:
            continue
        rot = jnp.conj(n).T.astype(x.dtype) @ o.astype(x.dtype)
        if second:
            rot = (jnp.abs(rot) ** 2).astype(x.dtype)
        x = linalg.mode_product(x, rot, mode)
    return x.astype(moment.dtype)

"""GaLore: the base optimizer runs on low-rank projections of matrix gradients."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks, _legacy, paths
from galore_jax import _matrix_plan as mp
from galore_jax import _projector_codes as codes
from galore_jax import _sharding_ops as sops
from galore_jax._low_rank import (
    GradScaleTransformation,
    Schedule,
    is_empty,
    low_rank_transform,
)
from galore_jax.dimensions import DimensionNumbers, resolve_dimension_numbers
from galore_jax.linalg import _stages
from galore_jax.linalg._qr import compute_dtype
from galore_jax.linalg._svd import range_finder
from galore_jax.options import ProjectorStorage, RandomizedSVD, Refresh

__all__ = ["MatrixProjectors", "ScaleByGaloreState", "scale_by_galore"]


class MatrixProjectors(NamedTuple):
    """GaLore's projectors, one tree per side (arrays only, `()` where a leaf has none).

    Kept side by side rather than as a tuple per leaf: Flax's `nnx.Optimizer`
    round-trips states through `nnx.State`, which turns containers nested inside
    a params-shaped tree into dicts; trees of plain arrays survive it.
    """

    left: Any  # per param: U (*batch, m, r) for left / full projection, else ().
    right: Any  # per param: Vh (*batch, r, n) for right / full projection, else ().
    # With ProjectorStorage(bits=8 | 4), left and right hold int8 / packed int4 codes
    # and these the float32 scales (`galore_jax._projector_codes`).
    left_scales: Any = ()
    right_scales: Any = ()


class ScaleByGaloreState(NamedTuple):
    """State of `scale_by_galore` (arrays only: jit, sharding, orbax and nnx just work)."""

    count: jax.Array  # shape=(), dtype=jnp.int32. Updates applied so far.
    key: jax.Array  # shape=(2,), dtype=jnp.uint32. PRNG key for randomized refreshes.
    projectors: MatrixProjectors
    base_state: optax.OptState  # base optimizer state over the low-rank gradients.
    skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32. Refreshes skipped (non-finite grads).


_SIDES = {"left": ("left",), "right": ("right",), "full": ("left", "right")}
_VECTOR_AXIS = {"left": -2, "right": -1}  # U's columns / Vh's rows are the basis vectors
_SLOTS = MatrixProjectors._fields


def _side_arrays(slots) -> tuple:
    return tuple(p for p in slots if not is_empty(p))


class MatrixGaLore:
    """GaLore's `LowRankAlgorithm`: matrix projectors, full precision or int8 / int4."""

    num_slots = len(_SLOTS)

    def __init__(self, rank, proj_type, refresh: Refresh, storage: ProjectorStorage, dims):
        self.rank, self.proj_type, self.refresh_options = rank, proj_type, refresh
        self.bits, self.group_size = storage.bits, storage.group_size
        self.dimension_numbers = dims

    def plans(self, params):
        names, leaves, treedef = paths.leaf_paths(params)
        dims = resolve_dimension_numbers(self.dimension_numbers, params)
        plans = []
        for path, leaf, d in zip(names, leaves, dims):
            _checks.check_leaf_dtype("scale_by_galore", path, leaf)
            ndim = jnp.ndim(leaf) - (len(d.batch_axes) if d is not None else 0)
            if ndim < 2:
                if d is not None and self.dimension_numbers is not None:  # inferred: a stack
                    raise ValueError(
                        f"dimension_numbers for '{path}' leave {ndim} matrix axes for a leaf of "
                        f"shape {jnp.shape(leaf)}; exactly 2 must remain"
                    )
                plans.append(None)
            else:
                plans.append(mp.matrix_plan(jnp.shape(leaf), d, self.proj_type, self.rank, path))
        return names, leaves, treedef, plans

    pack = staticmethod(lambda slots: MatrixProjectors(*slots))

    def encode(self, plan, arrays) -> tuple:
        """The side's projector arrays -> the four `MatrixProjectors` slots."""
        slots = dict.fromkeys(_SLOTS, ())
        for side, p in zip(_SIDES[plan.side], arrays):
            if self.bits == 32:
                slots[side] = p
            else:
                q = codes.quantize_projector(
                    p, self.bits, axis=_VECTOR_AXIS[side], group_size=self.group_size
                )
                slots[side], slots[side + "_scales"] = q.codes, q.scales
        return tuple(slots[k] for k in _SLOTS)

    def decode(self, plan, slots, dtype) -> tuple:
        """The four slots -> the side's projector arrays (dequantized to `dtype`)."""
        if self.bits == 32:
            return _side_arrays(slots)
        out = []
        for side, shape in zip(_SIDES[plan.side], plan.projector_shapes()):
            q = codes.QuantizedProjector(
                slots[_SLOTS.index(side)], slots[_SLOTS.index(side + "_scales")]
            )
            out.append(
                codes.dequantize_projector(q, self.bits, dtype, shape, axis=_VECTOR_AXIS[side])
            )
        return tuple(out)

    def init(self, plan, dtype):
        return self.encode(plan, mp.init_projectors(plan, dtype))

    def low_shape(self, plan):
        return plan.low_rank_shape()

    def to_low(self, plan, g, p):
        return mp.project(plan, plan.to_standard(g), self.decode(plan, p, jnp.result_type(g)))

    def from_low(self, plan, low, p, dtype):
        full = mp.project_back(plan, low, self.decode(plan, p, jnp.result_type(low)), dtype)
        return plan.from_standard(full)

    def refresh(self, plans, gs, olds, *, keys, warm, valid):
        news = mp.refresh_projectors(
            plans,
            [plan.to_standard(g) for plan, g in zip(plans, gs)],
            [self.decode(plan, old, jnp.result_type(g)) for plan, g, old in zip(plans, gs, olds)],
            refresh=self.refresh_options,
            keys=keys,
            warm=warm,
            valid=valid,
        )
        # Codes and scales keep the old ones' shardings, so lax.switch branches agree.
        return [
            tuple(
                p if is_empty(p) else sops.match_sharding(p, o)
                for p, o in zip(self.encode(plan, new), old)
            )
            for plan, new, old in zip(plans, news, olds)
        ]

    def subspace_refresh(self, plans, olds, *, keys, dtypes):
        """What `galore_jax.subspace` needs to refresh these leaves from products with
        their gradients alone: (range finder, `mp.RefreshTask`s, each leaf's tasks)."""
        if not isinstance(self.refresh_options, RandomizedSVD):
            raise ValueError(
                "gradients accumulated in the subspace need a randomized refresh "
                "(svd='randomized' or gj.RandomizedSVD(...)): an exact SVD needs the whole "
                "gradient. Use svd='randomized', or full-size gradients"
            )
        decoded = [self.decode(plan, old, dt) for plan, old, dt in zip(plans, olds, dtypes)]
        tasks, sides = mp.refresh_tasks(plans, decoded, keys=keys, warm=True)
        stage_tasks = []
        for t in tasks:
            plan = plans[t.leaf]
            m, n = plan.matrix_shape
            shape = (*plan.batch_shape, *((n, m) if t.adjoint else (m, n)))
            stage_tasks.append(
                _stages.Task(shape, compute_dtype(dtypes[t.leaf]), t.rank, t.key, t.init)
            )
        kwargs = mp.refresh_kwargs(self.refresh_options)
        kwargs.pop("svd")
        return range_finder(stage_tasks, **kwargs), tasks, sides

    def subspace_projectors(self, plans, sides, bases, olds, dtypes):
        """The leaves' new projector slots from their tasks' bases (as `refresh` returns)."""
        decoded = [self.decode(plan, old, dt) for plan, old, dt in zip(plans, olds, dtypes)]
        news = mp.projectors_from_bases(plans, sides, bases, decoded)
        return [
            tuple(
                p if is_empty(p) else sops.match_sharding(p, o)
                for p, o in zip(self.encode(plan, new), old)
            )
            for plan, new, old in zip(plans, news, olds)
        ]

    def rotate(self, plan, moment, old, new, *, second):
        dtype = compute_dtype(moment.dtype)
        rotations = mp.rotation(plan, self.decode(plan, old, dtype), self.decode(plan, new, dtype))
        return mp.rotate_moment(moment, rotations, second=second)


@_legacy.moved_keywords(svd=_legacy.REFRESH_KEYWORDS, projector=_legacy.PROJECTOR_KEYWORDS)
def scale_by_galore(
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: Union[str, Refresh] = "randomized",
    on_refresh: str = "keep",
    stagger: bool = False,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    projector: Optional[ProjectorStorage] = None,
    dimension_numbers: Union[None, DimensionNumbers, Any, Callable[[Any], Any]] = None,
) -> GradScaleTransformation:
    """GaLore: runs `base_optimizer` on low-rank projections of matrix gradients.

    Every leaf with two matrix axes (plus optional batch axes, see
    `dimension_numbers`) is projected; leaves with fewer than two axes go to the
    base optimizer in full space, unscaled (as galore-torch's non-GaLore group).
    Without `dimension_numbers`, stacked layers are found by structure
    (`galore_jax.dimensions.infer_dimension_numbers`: a leading axis no feature
    dimension shares): (L, m, n) leaves get L projectors, (L, d) leaves stay in
    full space; other N-D leaves are flattened to (d0, prod(rest)).

    Degenerate gradients: a refresh always yields an orthonormal basis of the
    asked rank (where the gradient has no energy, e.g. zero at step 0 or rank
    deficient, the basis is completed with random orthonormal directions). A
    leaf whose gradient is not finite is treated as zero gradient for that step
    (like `optax.zero_nans`, for the whole leaf), and a refresh due at that step
    keeps the previous basis; `skipped_refreshes` in the state counts them.

    Projection side (fixed per leaf at trace time, galore-torch semantics for an
    m x n gradient): `std` projects on the right (G Vh_r^H, moments m x r) when
    m >= n, else on the left (U_r^H G, moments r x n); `reverse_std` the
    opposite; `left` / `right` forced; `full` both (U_r^H G Vh_r^H, r x r).

    Refresh schedule: every leaf refreshes at step 0 from the first gradient.
    Without `stagger` all leaves then refresh together at steps T, 2T, ...
    With `stagger`, leaf i (among the projected leaves, in tree order) refreshes
    at k*T + offset_i for k >= 1, offsets spread evenly over [0, T), so no single
    step pays for every SVD. Stacked layers of one leaf refresh together.

    `on_refresh` says what happens to the base optimizer's low-rank moments when
    a leaf's subspace changes:
      * "keep" (galore-torch): left as they are, reinterpreted in the new basis.
      * "reset": set to zero (the base optimizer's shared step count, and so its
        bias correction, is not reset).
      * "project": first moments are rotated into the new basis with
        P_new^H P_old (exact for the part of the moment inside both subspaces).
        Second moments are per-coordinate magnitudes that cannot be rotated: they
        are mapped with the elementwise-squared rotation |P_new^H P_old|^2, which
        is exact when the old coordinates are uncorrelated and keeps their scale.

    Extra args of `update` (optax's `GradientTransformationExtraArgs`):
    `grad_scale` and `update_scale`, scalars (None: 1) that multiply the
    gradients before and the updates after, as `optax.scale` stages chained
    before and after would, but in the low-rank space, so no pass over a
    full-size array is added (`galore_adamw` passes its clip factor and
    learning rate through them). A refresh still sees the scaled gradient.

    Args:
      rank: int rank, or float in (0, 1] as a fraction of the projected dim.
      update_proj_gap: steps between subspace refreshes (T).
      scale: multiplies the projected-back update (GaLore's alpha). May be an array.
      proj_type: "std" | "reverse_std" | "left" | "right" | "full".
      svd: how a subspace is refreshed: "randomized" (`gj.RandomizedSVD()`, GaLore
        2's range finder with Cholesky-QR + eigh; it sets oversampling, power
        iterations, warm starts, the seed), "exact" (`gj.ExactSVD()`), or an object.
      on_refresh: "keep" | "reset" | "project" (see above).
      stagger: spread the leaves' refreshes over the gap.
      base_optimizer: transformation run on the low-rank gradients; default
        `optax.scale_by_adam()`. It must not need `params` (they are not low-rank).
      projector: how projectors are stored: None (full precision, the param's
        dtype) or `gj.ProjectorStorage(bits=8 | 4, group_size=...)` for int8 /
        packed int4 codes with float32 absmax scales (Q-GaLore), dequantized on
        use. Moments' precision is the base optimizer's (e.g.
        `gj.scale_by_adam_8bit()`).
      dimension_numbers: `DimensionNumbers(batch_axes=...)` for all leaves, a
        pytree matching the params of DimensionNumbers or None, or a callable
        params -> such a pytree. Batch axes (e.g. the layer axis of scanned
        weights of shape (L, m, n)) get independent projectors. None: inferred
        from the structure (see above).

    Returns:
      A `GradScaleTransformation` (an `optax.GradientTransformationExtraArgs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
      >>> tx = optax.chain(gj.scale_by_galore(rank=4, update_proj_gap=10), optax.scale(-1e-2))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state)
      >>> updates["w"].shape, state[0].projectors.right["w"].shape  # Vh: rank x n
      ((16, 8), (4, 8))

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024. https://arxiv.org/abs/2403.03507
      Su et al., GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank
      Projection, 2025. https://arxiv.org/abs/2504.20437
    """
    _checks.check_rank_value(rank)
    schedule = Schedule.checked(update_proj_gap, on_refresh, stagger, svd)
    _checks.check_choice("proj_type", proj_type, _checks.PROJ_TYPES)
    projector = _checks.check_option("projector", projector, ProjectorStorage)
    _checks.check_base_optimizer(base_optimizer, "scale_by_galore")
    algorithm = MatrixGaLore(rank, proj_type, schedule.refresh, projector, dimension_numbers)
    return low_rank_transform(
        algorithm,
        schedule,
        scale=scale,
        base_optimizer=base_optimizer,
        projector_dtype=projector.dtype,
        state_cls=ScaleByGaloreState,
    )

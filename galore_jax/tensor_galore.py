"""Tensor-GaLore: the base optimizer runs on the Tucker core of N-D gradients."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks, _legacy, paths
from galore_jax import _tucker_plan as tp
from galore_jax._low_rank import (
    GradScaleTransformation,
    Schedule,
    is_empty,
    low_rank_transform,
)
from galore_jax.options import ProjectorStorage, Refresh

__all__ = ["ScaleByTensorGaloreState", "scale_by_tensor_galore"]

# The state keeps one factor tree per mode; a fixed count keeps the state's
# structure independent of the params' shapes (optax.tree.map_params).
MAX_TUCKER_MODES = 8


class ScaleByTensorGaloreState(NamedTuple):
    """State of `scale_by_tensor_galore` (arrays only)."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    key: jax.Array  # shape=(2,), dtype=jnp.uint32.
    factors: tuple  # factors[k]: per param, its (d_k, r_k) mode-k factor, or () if none.
    base_state: optax.OptState  # base optimizer state over the Tucker cores.
    skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32.


def _factors(slots) -> tuple:
    return tuple(p for p in slots if not is_empty(p))


class TuckerGaLore:
    """Tensor-GaLore's `LowRankAlgorithm`: one factor per projected mode (HOSVD)."""

    num_slots = MAX_TUCKER_MODES
    pack = staticmethod(tuple)

    def __init__(self, rank, modes, refresh: Refresh):
        self.rank, self.modes, self.refresh_options = rank, modes, refresh

    def plans(self, params):
        names, leaves, treedef = paths.leaf_paths(params)
        plans = []
        for path, leaf in zip(names, leaves):
            _checks.check_leaf_dtype("scale_by_tensor_galore", path, leaf)
            if jnp.ndim(leaf) < 2:
                plans.append(None)
            elif jnp.ndim(leaf) > MAX_TUCKER_MODES:
                raise ValueError(
                    f"scale_by_tensor_galore: leaf '{path}' has {jnp.ndim(leaf)} modes; at most "
                    f"{MAX_TUCKER_MODES} are supported (reshape it, or label it for plain Adam)"
                )
            else:
                plans.append(tp.tucker_plan(jnp.shape(leaf), self.rank, self.modes, path))
        return names, leaves, treedef, plans

    def slots(self, plan, factors) -> tuple:
        per_mode = [() if f is None else f for f in plan.expand(tuple(factors))]
        return tuple(per_mode) + ((),) * (self.num_slots - len(per_mode))

    def init(self, plan, dtype):
        return self.slots(plan, [jnp.zeros(s, dtype) for s in plan.factor_shapes()])

    def low_shape(self, plan):
        return plan.core_shape()

    def to_low(self, plan, g, p):
        return tp.tucker_project(plan, g, _factors(p))

    def from_low(self, plan, low, p, dtype):
        return tp.tucker_project_back(plan, low, _factors(p))

    def refresh(self, plans, gs, olds, *, keys, warm, valid):
        return [
            self.slots(
                plan,
                tp.tucker_refresh(
                    plan,
                    jnp.where(v, g, 0),  # the HOSVD's unfoldings copy g anyway
                    _factors(old),
                    refresh=self.refresh_options,
                    key=key,
                    warm=warm,
                ),
            )
            for plan, g, old, key, v in zip(plans, gs, olds, keys, valid)
        ]

    def rotate(self, plan, moment, old, new, *, second):
        return tp.tucker_rotate_moment(plan, moment, _factors(old), _factors(new), second=second)


@_legacy.moved_keywords(
    svd=_legacy.REFRESH_KEYWORDS,
    projector={"projector_dtype": "dtype"},
)
def scale_by_tensor_galore(
    rank: Union[int, float, Sequence[Union[int, float, None]]] = 0.25,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    modes: Optional[Sequence[int]] = None,
    svd: Union[str, Refresh] = "exact",
    on_refresh: str = "keep",
    stagger: bool = False,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    projector: Optional[ProjectorStorage] = None,
) -> GradScaleTransformation:
    """Tensor-GaLore: base optimizer on the Tucker core of N-D gradients.

    For each leaf with >= 2 axes, factor k is the top r_k left singular vectors
    of the gradient's mode-k unfolding (HOSVD, sign-canonical); the base
    optimizer sees the core G x_k U_k^H and its update is mapped back with
    core x_k U_k, times `scale`. Complex leaves (FNO spectral weights) use
    conjugate transposes; the default `optax.scale_by_adam` keeps |g|^2 in its
    second moment for them. `jax.grad` of a real loss returns the conjugate of a
    complex param's descent direction: chain `gj.conjugate_complex_grads()` before
    this transform (training on the raw gradient stalls). Factors are recomputed
    from the current gradient at step 0 and every `update_proj_gap` steps
    (staggered if asked, as in `scale_by_galore`). Leaves with fewer than 2 axes
    get the base optimizer in full space.

    Extra args `grad_scale` and `update_scale`: as in `scale_by_galore`.

    Args:
      rank: an int rank for every projected mode; a float in (0, 1]: the fraction
        of each tensor's entries the Tucker core plus factors hold (tensorly's and
        neuraloperator's meaning; e.g. 0.25 on (24, 24, 8, 8) gives (17, 17, 6, 6));
        or a per-mode tuple of ints, float fractions of that mode, or None (mode
        unprojected), one entry per mode. A tuple of the wrong length or a rank
        above its mode's size is an error.
      update_proj_gap: steps between refreshes.
      scale: multiplies the projected-back update.
      modes: which modes to project (default: all).
      svd: "exact" (default), "randomized", or `gj.ExactSVD(...)` /
        `gj.RandomizedSVD(...)` (per-mode SVDs; oversample, power_iters,
        warm_start and seed apply).
      on_refresh: "keep" | "reset" | "project" (moments rotated mode by mode).
      stagger: spread leaves' refreshes over the gap.
      base_optimizer: default `optax.scale_by_adam()`.
      projector: None or `gj.ProjectorStorage(dtype=...)`: the dtype of the
        stored factors (default: the param's); factors are full precision.

    Returns:
      A `GradScaleTransformation` (an `optax.GradientTransformationExtraArgs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> w = jnp.ones((8, 8, 4, 4), jnp.complex64)
      >>> tx = gj.scale_by_tensor_galore(rank=0.5, update_proj_gap=50)
      >>> state = tx.init({"w": w})
      >>> [factor["w"].shape for factor in state.factors[:4]]  # one tree per mode
      [(8, 6), (8, 6), (4, 3), (4, 3)]
      >>> state.factors[4]["w"]  # modes a leaf does not have: empty
      ()

    References:
      George et al., Tensor-GaLore: Memory-Efficient Training via Gradient
      Tensor Decomposition, 2025. https://arxiv.org/abs/2501.02379
    """
    _checks.check_ranks("rank", rank)
    schedule = Schedule.checked(update_proj_gap, on_refresh, stagger, svd)
    projector = _checks.check_option("projector", projector, ProjectorStorage)
    if projector.bits != 32:
        raise ValueError(
            f"scale_by_tensor_galore keeps Tucker factors in full precision: "
            f"projector=ProjectorStorage(bits={projector.bits}) is for scale_by_galore"
        )
    _checks.check_base_optimizer(base_optimizer, "scale_by_tensor_galore")
    return low_rank_transform(
        TuckerGaLore(rank, modes, schedule.refresh),
        schedule,
        scale=scale,
        base_optimizer=base_optimizer,
        projector_dtype=projector.dtype,
        state_cls=ScaleByTensorGaloreState,
    )

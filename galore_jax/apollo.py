"""APOLLO: the low-rank Adam only sets a scale for the raw gradient.

Per projected matrix (projection P, low-rank gradient R = P(G), the base
optimizer's low-rank update N, before its bias correction):

    phi = ||N||_d / (||R||_d + 1e-8)     scale_type "channel": one factor per row
                                         (right projection) or column (left);
                                         "tensor": one factor per matrix
    S   = G * phi                        (times sqrt(scale) before the limiter if
                                         scale_front, else after it)
    update = S                           (times the bias correction, the lr, ...)

The update is full rank and nothing is projected back. Since only the norms of
the low-rank update matter, the projection need not be a good basis: by default
it is random (no SVD at all), a Gaussian N(0, 1/rank) matrix drawn at each
refresh; the state stores the PRNG key it was drawn from (8 bytes per param) and
every step regenerates it, so the projector costs no memory. A stack of layers
(L, m, n) shares one drawn matrix. `svd="exact"` / `"randomized"` project on
GaLore's top singular vectors instead (stored, as in GaLore). APOLLO-Mini is
rank 1 with one scale per tensor (`apollo_mini_adamw`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks
from galore_jax import _matrix_plan as mp
from galore_jax import _sharding_ops as sops
from galore_jax._low_rank import GradScaleTransformation, Schedule, low_rank_transform
from galore_jax.dimensions import DimensionNumbers
from galore_jax.fira import (
    EPS,
    PROJ_TYPES,
    channel_axis,
    check_limit,
    full_size_gradient,
    limit_growth,
    low_rank_adamw,
    norms,
    unbiased,
)
from galore_jax.galore import MatrixGaLore
from galore_jax.options import AdamOptions, ProjectorStorage, Refresh, as_refresh

__all__ = [
    "RandomProjection",
    "RandomProjectors",
    "ScaleByApolloState",
    "apollo_adamw",
    "apollo_mini_adamw",
    "scale_by_apollo",
]

SCALE_TYPES = ("channel", "tensor")


@dataclasses.dataclass(frozen=True)
class RandomProjection:
    """APOLLO's default projection: Gaussian N(0, 1/rank), re-drawn at each refresh.

    Attributes:
      seed: seeds the state's PRNG key (each param's draws fold in its path).
    """

    seed: int = 0
    warm_start = False


class RandomProjectors(NamedTuple):
    """The random projections' state: per projected param the uint32 (2,) PRNG key
    its current projection is regenerated from, `()` where a param has none."""

    projection_keys: Any


class ScaleByApolloState(NamedTuple):
    """State of `scale_by_apollo` (arrays only)."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    key: jax.Array  # shape=(2,), dtype=jnp.uint32.
    projectors: Any  # RandomProjectors, or MatrixProjectors (svd="exact" / "randomized").
    base_state: optax.OptState  # base optimizer state over the low-rank gradients.
    skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32.
    limiter: Any  # per projected param: float32 (*batch,), ||S|| after the last limit.


class MatrixApollo(MatrixGaLore):
    """APOLLO's `LowRankAlgorithm` on GaLore's (SVD) projectors."""

    def __init__(self, *args, scale_type, scale_front, norm_growth_limit):
        super().__init__(*args)
        self.scale_type, self.scale_front = scale_type, scale_front
        self.limit = norm_growth_limit

    def leaf_state(self, plan):
        return jnp.zeros(plan.batch_shape, jnp.float32)

    def full_update(self, plan, g, low_g, low_u, projectors, prev, ctx):
        del projectors  # nothing is projected back
        G, finite = full_size_gradient(plan, g, ctx)
        n, c = unbiased(low_u, ctx)
        r = low_g.astype(n.dtype)
        axis = channel_axis(plan) if self.scale_type == "channel" else (-2, -1)
        s = G * (norms(n, axis) / (norms(r, axis) + EPS))
        root = jnp.sqrt(jnp.asarray(ctx.scale, jnp.float32)).astype(s.real.dtype)
        if self.scale_front:
            s = s * root
        s, prev = limit_growth(s, prev, self.limit, finite)
        factor = c.astype(s.real.dtype) if self.scale_front else c.astype(s.real.dtype) * root
        if ctx.update_scale is not None:
            factor = factor * jnp.asarray(ctx.update_scale, s.real.dtype)
        return plan.from_standard(s * factor), prev


class RandomApollo(MatrixApollo):
    """APOLLO on random projections kept as PRNG keys (regenerated every step)."""

    num_slots = 1
    pack = staticmethod(lambda slots: RandomProjectors(*slots))

    def init(self, plan, dtype):
        return (jnp.zeros((2,), jnp.uint32),)

    def matrix(self, plan, key, dtype):
        """The leaf's projection: U (m, r) for a left side, Vh (r, n) for a right one
        (shared by a stack's layers, so one layer's slice draws what the stack does)."""
        m, n = plan.matrix_shape
        shape = (m, plan.rank) if plan.side == "left" else (plan.rank, n)
        f32 = jnp.promote_types(jnp.real(jnp.zeros([], dtype)).dtype, jnp.float32)
        p = jax.random.normal(key, shape, f32) / math.sqrt(plan.rank)
        return (p.astype(dtype),)

    def to_low(self, plan, g, p):
        return mp.project(plan, plan.to_standard(g), self.matrix(plan, p[0], jnp.result_type(g)))

    def from_low(self, plan, low, p, dtype):
        m = self.matrix(plan, p[0], jnp.result_type(low))
        return plan.from_standard(mp.project_back(plan, low, m, dtype))

    def refresh(self, plans, gs, olds, *, keys, warm, valid):
        del plans, gs, warm, valid  # a random projection ignores the gradient
        return [(sops.match_sharding(k, old[0]),) for k, old in zip(keys, olds)]

    def rotate(self, plan, moment, old, new, *, second):  # refused at construction
        raise NotImplementedError("on_refresh='project' needs orthonormal projections")


def _refresh(svd):
    if svd == "random":
        return RandomProjection()
    if isinstance(svd, RandomProjection):
        return svd
    try:
        return as_refresh(svd)
    except ValueError:
        raise ValueError(
            "svd must be 'random', 'randomized', 'exact', gj.apollo.RandomProjection(...), "
            f"gj.RandomizedSVD(...) or gj.ExactSVD(...); got {svd!r}"
        ) from None


def scale_by_apollo(
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    svd: Union[str, Refresh, RandomProjection] = "random",
    scale_type: str = "channel",
    scale_front: bool = False,
    on_refresh: str = "keep",
    stagger: bool = False,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    projector: Optional[ProjectorStorage] = None,
    dimension_numbers: Union[None, DimensionNumbers, Any, Callable[[Any], Any]] = None,
    norm_growth_limit: Optional[float] = 1.01,
) -> GradScaleTransformation:
    """APOLLO: the raw gradient, scaled by what Adam does to its projection.

    See the module docstring for the update. Leaves, projection sides, stacked
    layers, refresh scheduling and the extra args `grad_scale` / `update_scale`:
    as in `gj.scale_by_galore`. The scale `phi` and the limiter use the base
    optimizer's update before its bias correction (as apollo-torch 1.0.3), as in
    `gj.scale_by_fira`.

    Args:
      rank: projection rank (APOLLO-Mini: 1).
      update_proj_gap: steps between new projections.
      scale: the update is multiplied by sqrt(scale) (apollo-torch's `scale`; 1 for
        APOLLO, 128 for APOLLO-Mini).
      proj_type: "std" | "reverse_std" | "left" | "right" (sides as in GaLore).
      svd: "random" (default: `gj.apollo.RandomProjection()`, no SVD, nothing but a
        key stored), or "exact" / "randomized" / an SVD option object: GaLore's
        stored SVD projectors.
      scale_type: "channel" (one factor per row / column) or "tensor" (one per matrix).
      scale_front: apply sqrt(scale) before the limiter instead of after it.
      on_refresh, stagger: as in `gj.scale_by_galore` ("project" needs an SVD).
      base_optimizer: runs on the low-rank gradients (default `optax.scale_by_adam()`).
      projector: how SVD projectors are stored, as in `gj.scale_by_galore` (int8 / int4
        codes); a random projection stores only its key (bits=32 only).
      dimension_numbers: as in `gj.scale_by_galore`.
      norm_growth_limit: the limiter's largest growth of ||S|| per step, or None.

    Returns:
      A `GradScaleTransformation`; its state is a `ScaleByApolloState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> params = {"w": jnp.ones((16, 8))}
      >>> tx = optax.chain(gj.scale_by_apollo(4, update_proj_gap=10), optax.scale(-1e-2))
      >>> state = tx.init(params)
      >>> updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state)
      >>> state[0].projectors.projection_keys["w"].shape, state[0].base_state.mu["w"].shape
      ((2,), (16, 4))

    References:
      Zhu et al., APOLLO: SGD-like Memory, AdamW-level Performance, MLSys 2025.
      https://arxiv.org/abs/2412.05270
    """
    _checks.check_rank_value(rank)
    refresh = _refresh(svd)
    _checks.check_schedule(update_proj_gap, on_refresh, stagger)
    random = isinstance(refresh, RandomProjection)
    if random and on_refresh == "project":
        raise ValueError(
            "on_refresh='project' rotates moments between orthonormal bases; svd='random' "
            "draws Gaussian projections: use on_refresh='keep' / 'reset', or an SVD"
        )
    _checks.check_choice("proj_type", proj_type, PROJ_TYPES)
    _checks.check_choice("scale_type", scale_type, SCALE_TYPES)
    if not isinstance(scale_front, bool):
        raise TypeError(f"scale_front must be a bool, got {scale_front!r}")
    check_limit(norm_growth_limit)
    _checks.check_base_optimizer(base_optimizer, "scale_by_apollo")
    projector = _checks.check_option("projector", projector, ProjectorStorage)
    if random and projector != ProjectorStorage():
        raise ValueError(
            f"projector={projector!r} stores SVD projectors; svd='random' stores a key per "
            "param: use svd='exact' / 'randomized' for low-bit projectors"
        )
    cls = RandomApollo if random else MatrixApollo
    algorithm = cls(
        rank,
        proj_type,
        refresh,
        projector,
        dimension_numbers,
        scale_type=scale_type,
        scale_front=scale_front,
        norm_growth_limit=norm_growth_limit,
    )
    return low_rank_transform(
        algorithm,
        Schedule(update_proj_gap, on_refresh, stagger, refresh),
        scale=scale,
        base_optimizer=base_optimizer,
        projector_dtype=projector.dtype,
        state_cls=ScaleByApolloState,
    )


def apollo_adamw(
    learning_rate: Union[float, optax.Schedule],
    *,
    rank: Union[int, float] = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    proj_type: str = "std",
    svd: Union[str, Refresh, RandomProjection] = "random",
    norm_growth_limit: Optional[float] = 1.01,
    on_refresh: str = "keep",
    stagger: bool = False,
    adam: Optional[AdamOptions] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
    labels: Any = None,
) -> GradScaleTransformation:
    """AdamW with APOLLO on the matrices GaLore would project (`gj.galore_adamw`'s labels).

    Matrices and stacked matrices -> `scale_by_apollo`; embeddings, heads, norms,
    biases, vectors and other >= 3-D tensors -> plain Adam. Arguments as in
    `gj.galore_adamw` and `gj.scale_by_apollo`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import galore_jax as gj
      >>> params = {"embed": jnp.zeros((32, 8)), "mlp": jnp.ones((8, 16)), "norm": jnp.ones(8)}
      >>> tx = gj.apollo_adamw(1e-2, rank=4)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> updates["mlp"].shape
      (8, 16)
    """
    return low_rank_adamw(
        learning_rate,
        scale_by=scale_by_apollo,
        options=dict(
            update_proj_gap=update_proj_gap,
            scale=scale,
            svd=_refresh(svd),
            scale_type=scale_type,
            norm_growth_limit=norm_growth_limit,
            on_refresh=on_refresh,
            stagger=stagger,
        ),
        rank=rank,
        proj_type=proj_type,
        adam=adam,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        max_grad_norm=max_grad_norm,
        labels=labels,
        name="apollo_adamw",
    )


def apollo_mini_adamw(
    learning_rate: Union[float, optax.Schedule],
    *,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    svd: Union[str, Refresh, RandomProjection] = "random",
    norm_growth_limit: Optional[float] = 1.01,
    on_refresh: str = "keep",
    stagger: bool = False,
    adam: Optional[AdamOptions] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
    labels: Any = None,
) -> GradScaleTransformation:
    """APOLLO-Mini: `apollo_adamw` at rank 1 with one scale per matrix, scale 128.

    Its low-rank state is one row or column of moments per matrix, so the state is
    about that of the plain-Adam leaves (embeddings, head, norms) alone; with
    `adam=gj.AdamOptions(bits=8)` those are 8-bit too.

    Example:
      >>> import jax.numpy as jnp, galore_jax as gj
      >>> params = {"mlp": jnp.ones((8, 16))}
      >>> gj.describe(gj.apollo_mini_adamw(1e-2), params).by_path()["mlp"].moment_shapes
      [(1, 16), (1, 16)]
    """
    return apollo_adamw(
        learning_rate,
        rank=1,
        update_proj_gap=update_proj_gap,
        scale=scale,
        scale_type="tensor",
        svd=svd,
        norm_growth_limit=norm_growth_limit,
        on_refresh=on_refresh,
        stagger=stagger,
        adam=adam,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        max_grad_norm=max_grad_norm,
        labels=labels,
    )

"""Fira: GaLore's low-rank Adam plus a norm-scaled full-rank residual of the gradient.

Per projected matrix (GaLore's projector P, its low-rank gradient R = P(G), the
base optimizer's low-rank update N, before its bias correction):

    phi = ||N||_d / (||R||_d + 1e-8)        one factor per row (right projection,
                                            N is m x r) or per column (left, r x n)
    S   = (G - scale * back(R)) * phi       the residual, scaled like Adam would
    S   = S / limiter                       norm-growth limiter (below)
    update = scale * back(N) + S            (times the bias correction, the lr, ...)

so the part of the gradient GaLore throws away still trains the weights, at the
cost of one matrix multiply and one float per matrix of state. The limiter keeps
||S|| from growing by more than `norm_growth_limit` per step:
`lim = max(||S|| / (prev + 1e-8), limit) / limit`, `S /= lim`, `prev = ||S||`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from galore_jax import _checks, alias
from galore_jax import _matrix_plan as mp
from galore_jax import labels as labels_lib
from galore_jax._fused import adamw_chain
from galore_jax._low_rank import (
    GradScaleTransformation,
    Schedule,
    low_rank_transform,
    scaled_by,
    zero_if_not_finite,
)
from galore_jax.dimensions import DimensionNumbers
from galore_jax.galore import MatrixGaLore, MatrixProjectors
from galore_jax.linalg._qr import compute_dtype
from galore_jax.options import AdamOptions, ProjectorStorage, Refresh, Tucker
from galore_jax.tensor_galore import scale_by_tensor_galore

__all__ = ["ScaleByFiraState", "fira_adamw", "scale_by_fira"]

EPS = 1e-8  # the packages' (fira 1.0.2, apollo-torch 1.0.3) guard in both ratios


class ScaleByFiraState(NamedTuple):
    """State of `scale_by_fira`: GaLore's, plus the limiter's last norm per matrix."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    key: jax.Array  # shape=(2,), dtype=jnp.uint32.
    projectors: MatrixProjectors
    base_state: optax.OptState  # base optimizer state over the low-rank gradients.
    skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32.
    limiter: Any  # per projected param: float32 (*batch,), ||S|| after the last limit.


def check_limit(norm_growth_limit) -> None:
    """None (off) or a number > 1 (1.01 in both papers)."""
    if norm_growth_limit is None:
        return
    if isinstance(norm_growth_limit, bool) or not (
        isinstance(norm_growth_limit, (int, float)) or jnp.ndim(norm_growth_limit) == 0
    ):
        raise TypeError(f"norm_growth_limit must be None or a float > 1, got {norm_growth_limit!r}")
    try:  # an array (optax.inject_hyperparams) is checked where it is concrete
        value = float(norm_growth_limit)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not value > 1:
        raise ValueError(f"norm_growth_limit must be None or > 1, got {norm_growth_limit!r}")


def norms(x: jax.Array, axis) -> jax.Array:
    """L2 norms along `axis` (kept), in float32."""
    return jnp.sqrt(jnp.sum(jnp.abs(x) ** 2, axis=axis, keepdims=True))


def limit_growth(s: jax.Array, prev: jax.Array, limit, finite) -> tuple:
    """(s limited, new prev): the norm-growth limiter on s (*batch, m, n) per batch entry.

    `prev` 0 means no history (the first step, or a gradient that was zero every step
    so far): s passes unlimited and its norm becomes the history, so a zero first
    gradient does not pin the residual near zero for thousands of steps. A step whose
    gradient was not finite keeps the history.
    """
    if limit is None:
        return s, prev
    norm = jnp.sqrt(jnp.sum(jnp.abs(s) ** 2, axis=(-2, -1)))
    lim = jnp.where(prev == 0, 1.0, jnp.maximum(norm / (prev + EPS), limit) / limit)
    new_prev = jnp.where(finite, norm / lim, prev)
    return s / lim[..., None, None].astype(s.dtype), new_prev


def full_size_gradient(plan, g, ctx) -> tuple:
    """(the raw gradient in the plan's standard layout, grad_scale applied, zero if
    not finite; whether it was finite) in float32 / complex64."""
    std = plan.to_standard(g)
    f32 = compute_dtype(std.dtype)
    std = scaled_by(std.astype(f32), ctx.grad_scale)
    return zero_if_not_finite(std), jnp.all(jnp.isfinite(std))


def unbiased(low_u, ctx):
    """(N, c): the base optimizer's update before its bias correction c (1 if unknown)."""
    c = jnp.ones([], jnp.float32) if ctx.bias_correction is None else ctx.bias_correction
    low_u = low_u.astype(compute_dtype(low_u.dtype))
    return low_u / c.astype(low_u.real.dtype), c


def channel_axis(plan) -> int:
    """The low-rank axis the per-channel norms run along: the rank axis, so one factor
    per row of a right projection's m x r, or per column of a left one's r x n."""
    return -1 if plan.side == "right" else -2


class MatrixFira(MatrixGaLore):
    """Fira's `LowRankAlgorithm`: GaLore's projectors, a limited residual on top."""

    def __init__(self, *args, norm_growth_limit=1.01):
        super().__init__(*args)
        self.limit = norm_growth_limit

    def leaf_state(self, plan):
        return jnp.zeros(plan.batch_shape, jnp.float32)

    def full_update(self, plan, g, low_g, low_u, projectors, prev, ctx):
        G, finite = full_size_gradient(plan, g, ctx)
        n, c = unbiased(low_u, ctx)
        r = low_g.astype(n.dtype)
        axis = channel_axis(plan)
        phi = norms(n, axis) / (norms(r, axis) + EPS)
        p = self.decode(plan, projectors, n.dtype)
        residual = (G - mp.project_back(plan, scaled_by(r, ctx.scale), p)) * phi
        residual, prev = limit_growth(residual, prev, self.limit, finite)
        full = mp.project_back(plan, scaled_by(low_u.astype(n.dtype), ctx.scale), p)
        full = scaled_by(full + residual * c.astype(residual.real.dtype), ctx.update_scale)
        return plan.from_standard(full), prev


# "full" (r x r) has no per-row or per-column scale for an m x n residual.
PROJ_TYPES = tuple(t for t in _checks.PROJ_TYPES if t != "full")


def scale_by_fira(
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
    norm_growth_limit: Optional[float] = 1.01,
) -> GradScaleTransformation:
    """Fira: GaLore plus the norm-scaled full-rank residual (see the module docstring).

    Leaves, projection sides, refreshes, stacked layers, `on_refresh`, `stagger`,
    low-bit projectors and the extra args `grad_scale` / `update_scale`: as in
    `gj.scale_by_galore`, whose numerics the low-rank part shares. Leaves with
    fewer than two matrix axes get the base optimizer in full space.

    The residual's scale `phi` and the limiter use the base optimizer's update
    before its bias correction (as fira 1.0.2 does): `gj.scale_by_torch_adam`,
    `gj.scale_by_adam_8bit`, the default `optax.scale_by_adam()` and the aliases'
    Adam report that factor; another base optimizer's update is used as it is.

    Args:
      rank, update_proj_gap, proj_type, svd, on_refresh, stagger, projector,
        dimension_numbers: as in `gj.scale_by_galore` (proj_type "full" has no
        per-channel residual scale and is refused).
      scale: Fira's alpha: multiplies the projected-back update; the residual is
        `G - scale * back(R)` (so with scale != 1 it keeps (1 - scale) of the
        projected part, as the package computes it).
      base_optimizer: runs on the low-rank gradients (default `optax.scale_by_adam()`).
      norm_growth_limit: the limiter's largest growth of ||S|| per step (1.01),
        or None for no limiter.

    Returns:
      A `GradScaleTransformation`; its state is a `ScaleByFiraState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
      >>> tx = optax.chain(gj.scale_by_fira(4, update_proj_gap=10), optax.scale(-1e-2))
      >>> state = tx.init(params)
      >>> updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state)
      >>> state[0].limiter["w"].shape, state[0].projectors.right["w"].shape
      ((), (4, 8))

    References:
      Chen et al., Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
      Constraint?, 2024. https://arxiv.org/abs/2410.01623
    """
    _checks.check_rank_value(rank)
    schedule = Schedule.checked(update_proj_gap, on_refresh, stagger, svd)
    _checks.check_choice("proj_type", proj_type, PROJ_TYPES)
    check_limit(norm_growth_limit)
    projector = _checks.check_option("projector", projector, ProjectorStorage)
    _checks.check_base_optimizer(base_optimizer, "scale_by_fira")
    algorithm = MatrixFira(
        rank,
        proj_type,
        schedule.refresh,
        projector,
        dimension_numbers,
        norm_growth_limit=norm_growth_limit,
    )
    return low_rank_transform(
        algorithm,
        schedule,
        scale=scale,
        base_optimizer=base_optimizer,
        projector_dtype=projector.dtype,
        state_cls=ScaleByFiraState,
    )


def low_rank_adamw(
    learning_rate,
    *,
    scale_by,
    options,
    rank,
    proj_type,
    adam,
    weight_decay,
    weight_decay_mask,
    max_grad_norm,
    labels,
    name,
) -> GradScaleTransformation:
    """The aliases' AdamW chain around a low-rank `transform(base)` (Fira, APOLLO):
    GaLore's labels, except that other >= 3-D tensors get plain Adam (a tensor
    labelled "tensor_galore" by the user gets Tensor-GaLore, as in `galore_adamw`).

    `scale_by(rank, proj_type=, base_optimizer=, dimension_numbers=, **options)` is
    the algorithm's transform (`scale_by_fira`, `scale_by_apollo`)."""
    _checks.check_ranks("rank", rank)

    def transform(base, labeler):
        return scale_by(
            rank, proj_type=proj_type, base_optimizer=base, dimension_numbers=labeler, **options
        )

    transform(None, None)  # checks the arguments now, not at init
    _checks.check_max_grad_norm(name, max_grad_norm)
    adam = _checks.check_option("adam", adam, AdamOptions)
    labeler = alias._Labeler(
        alias._labels(labels), rank=rank, proj_type=proj_type, tensors=labels_lib.ADAM
    )
    tucker = Tucker()
    return adamw_chain(
        learning_rate,
        max_grad_norm=max_grad_norm,
        labeler=labeler,
        adam_options=adam,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        galore_tx=lambda base: transform(base, labeler),
        tensor_tx=lambda base: scale_by_tensor_galore(
            tucker.rank, modes=tucker.modes, svd=tucker.svd, base_optimizer=base
        ),
        name=name,
    )


def fira_adamw(
    learning_rate: Union[float, optax.Schedule],
    *,
    rank: Union[int, float] = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: Union[str, Refresh] = "randomized",
    projector: Optional[ProjectorStorage] = None,
    norm_growth_limit: Optional[float] = 1.01,
    on_refresh: str = "keep",
    stagger: bool = False,
    adam: Optional[AdamOptions] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
    labels: Any = None,
) -> GradScaleTransformation:
    """AdamW with Fira on the matrices GaLore would project (`gj.galore_adamw`'s labels).

    Matrices and stacked matrices -> `scale_by_fira`; embeddings, heads, norms,
    biases, vectors and other >= 3-D tensors -> plain Adam. Arguments as in
    `gj.galore_adamw` and `gj.scale_by_fira`; `max_grad_norm` and the learning
    rate are applied as scalars in the low-rank space where they commute.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import galore_jax as gj
      >>> params = {"embed": jnp.zeros((32, 8)), "mlp": jnp.ones((8, 16)), "norm": jnp.ones(8)}
      >>> tx = gj.fira_adamw(1e-2, rank=4, update_proj_gap=100)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> gj.describe(tx, params).by_path()["mlp"].label
      'galore'
    """
    check_limit(norm_growth_limit)
    return low_rank_adamw(
        learning_rate,
        scale_by=scale_by_fira,
        options=dict(
            update_proj_gap=update_proj_gap,
            scale=scale,
            svd=svd,
            projector=projector,
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
        name="fira_adamw",
    )

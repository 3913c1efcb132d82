"""Optimizer factory: schedule, clipping and the optimizer named in the config.

``adamw``          optax.adamw (the full-rank baseline)
``galore``         galore_jax.galore_adamw (GaLore with randomized SVD, ...)
``tensor_galore``  galore_jax.tensor_galore_adamw (Tucker projections)
``optax_galore``   optax.contrib.galore (reference implementation, comparison)
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Optional

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from training.config import ConfigError, OptimizerConfig

try:  # The library may be absent in a stripped-down install.
    import galore_jax as gj
    _GJ_IMPORT_ERROR: Optional[BaseException] = None
except Exception as e:  # pragma: no cover - depends on the checkout
    gj = None
    _GJ_IMPORT_ERROR = e


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_fraction`` of the steps, then cosine decay.

    The cosine ends at ``final_lr_fraction * lr`` on the last step (GaLore paper:
    10% warmup, cosine to 10%).
    """
    warmup = int(cfg.warmup_fraction * total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.final_lr_fraction,
    )


def _require_galore_jax(name: str) -> Any:
    if gj is None or not hasattr(gj, "galore_adamw"):
        reason = f": {_GJ_IMPORT_ERROR}" if _GJ_IMPORT_ERROR else ""
        raise ConfigError(
            f"optimizer.name={name!r} needs the galore_jax library, which is not "
            f"available yet{reason}; use adamw or optax_galore")
    return gj


def _galore_options(cfg: OptimizerConfig) -> dict:
    return dict(
        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        update_proj_gap=cfg.update_proj_gap, scale=cfg.scale,
        proj_type=cfg.proj_type, svd=cfg.svd, oversample=cfg.oversample,
        power_iters=cfg.power_iters, warm_start=cfg.warm_start,
        on_refresh=cfg.on_refresh, stagger=cfg.stagger,
        label_overrides=cfg.label_overrides,
    )


def build_optimizer(
    cfg: OptimizerConfig,
    total_steps: int,
    *,
    dimension_numbers: Any = None,
    seed: int = 0,
    params: Any = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The full update rule: clip -> optimizer(schedule).

    Args:
      cfg: the ``optimizer`` config section.
      total_steps: number of optimizer steps (sets the schedule's length).
      dimension_numbers: per-param ``galore_jax.DimensionNumbers`` (or None)
        naming stacked-layer batch axes; used by the GaLore optimizers.
      seed: seeds the randomized SVD.
      params: the (abstract) params; needed only by
        ``tensor_rank_mode: params`` to turn the rank into per-mode ranks.

    Returns:
      ``(transformation, schedule)``; the schedule is also used for logging.
    """
    schedule = lr_schedule(cfg, total_steps)
    rank = cfg.rank  # per-mode Tucker ranks are no config value: passed beside cfg
    if cfg.name == "tensor_galore" and cfg.tensor_rank_mode == "params":
        rank = _param_fraction_ranks(cfg, params)
    try:
        tx = _build(cfg, schedule, dimension_numbers, seed, rank)
    except ValueError as e:  # the library names the bad argument and value
        raise ConfigError(f"optimizer: {e}") from None
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule


def _build(cfg: OptimizerConfig, schedule: optax.Schedule, dimension_numbers: Any,
           seed: int, rank: Any) -> optax.GradientTransformation:
    if cfg.name == "adamw":
        tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay)
    elif cfg.name in ("galore", "tensor_galore"):
        lib = _require_galore_jax(cfg.name)
        factory = getattr(lib, f"{cfg.name}_adamw", None)
        if factory is None:
            raise ConfigError(f"optimizer.name={cfg.name!r} is not available in this "
                              "galore_jax version")
        options = dict(_galore_options(cfg), rank=rank, seed=seed,
                       dimension_numbers=dimension_numbers)
        # Pass only what this factory takes (tensor_galore has no proj_type, ...).
        accepted = inspect.signature(factory).parameters
        tx = factory(schedule, **{k: v for k, v in options.items() if k in accepted})
    elif cfg.name == "optax_galore":
        if isinstance(cfg.rank, float):
            raise ConfigError("optimizer.rank must be an int for optax_galore, got "
                              f"{cfg.rank!r}")
        if dimension_numbers is not None and any(
                d is not None for d in jax.tree.leaves(
                    dimension_numbers, is_leaf=lambda x: x is None)):
            raise ConfigError(
                "optimizer.name='optax_galore' cannot project stacked layer weights;"
                " set model.scan_layers=false")
        adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        # Same selection as the GaLore paper: matrices get GaLore, embeddings,
        # LM head and norms get plain AdamW.
        tx = optax.partition(
            {"galore": optax.contrib.galore(
                schedule, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
                scale=cfg.scale, weight_decay=cfg.weight_decay, base_optimizer=adam),
             "adam": optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)},
            _matrix_labels)
    else:  # config validation already restricts the names
        raise ConfigError(f"unknown optimizer.name {cfg.name!r}")
    return tx


def tucker_ranks_for_param_fraction(shape: tuple, fraction: float) -> tuple[int, ...]:
    """Per-mode Tucker ranks holding about ``fraction`` of a tensor's entries.

    Ranks are ``round(c * d_k)`` (at least 1, at most ``d_k``) with ``c`` solving
    ``c^N prod(d) + c sum(d_k^2) = fraction prod(d)``: the core plus the factors
    have ``fraction`` times the tensor's size (tensorly's float Tucker rank).

    Example:
      >>> tucker_ranks_for_param_fraction((24, 24, 8, 8), 0.25)
      (17, 17, 6, 6)
    """
    size = math.prod(shape)
    squares = sum(d * d for d in shape)
    excess = lambda c: size * c ** len(shape) + squares * c - fraction * size  # noqa: E731
    lo, hi = 0.0, max(fraction, 1.0)
    for _ in range(60):  # excess() increases with c
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    c = (lo + hi) / 2
    return tuple(min(d, max(1, int(round(c * d)))) for d in shape)


def _param_fraction_ranks(cfg: OptimizerConfig, params: Any) -> Any:
    """``tensor_rank_mode: params``: the float rank as per-mode Tucker ranks."""
    if not isinstance(cfg.rank, float):
        raise ConfigError("optimizer.tensor_rank_mode='params' needs a float optimizer.rank "
                          f"(a fraction of each tensor's entries), got {cfg.rank!r}")
    if params is None:
        raise ConfigError("optimizer.tensor_rank_mode='params' needs the params' shapes")
    lib = _require_galore_jax(cfg.name)
    labels = lib.galore_labels(params, label_overrides=cfg.label_overrides,
                               matrices="adam", tensors="tensor_galore")
    shapes = sorted({tuple(p.shape) for p, label in zip(jax.tree.leaves(params),
                                                        jax.tree.leaves(labels))
                     if label == "tensor_galore"})
    if not shapes:
        return cfg.rank
    if len(shapes) > 1:
        raise ConfigError(
            "optimizer.tensor_rank_mode='params' needs every Tucker-projected tensor to "
            f"have one shape, got {shapes}; use tensor_rank_mode='mode'")
    return tucker_ranks_for_param_fraction(shapes[0], cfg.rank)


_PLAIN_ADAM_PATTERN = re.compile(r"embed|lm_head|norm|bias", re.IGNORECASE)


def _matrix_labels(params: Any) -> Any:
    """'galore' for 2-D weight matrices, 'adam' for everything else."""
    def label(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        is_matrix = len(leaf.shape) == 2 and not _PLAIN_ADAM_PATTERN.search(name)
        return "galore" if is_matrix else "adam"
    return jax.tree_util.tree_map_with_path(label, params)


def opt_state_shardings(
    tx: optax.GradientTransformation,
    abstract_opt_state: Any,
    abstract_params: Any,
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
) -> Any:
    """Shardings for the optimizer state, derived from the params' shardings.

    Uses ``galore_jax.state_shardings`` when available (it knows projector and
    low-rank moment layouts). Otherwise: a state leaf with exactly a param's
    shape takes that param's sharding (Adam moments), everything else
    (counters, keys, small projectors) is replicated.
    """
    del tx
    if gj is not None and hasattr(gj, "state_shardings"):
        return gj.state_shardings(abstract_opt_state, abstract_params, param_shardings)
    return shardings_by_shape(abstract_opt_state, abstract_params, param_shardings, mesh)


def shardings_by_shape(abstract_opt_state: Any, abstract_params: Any,
                       param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Fallback: params-shaped subtrees (Adam moments) get the params' shardings.

    Any other leaf takes the sharding of a param with the same shape and dtype
    if there is one, else it is replicated (counters, keys, small projectors).
    """
    replicated = NamedSharding(mesh, P())
    params_def = jax.tree.structure(abstract_params)
    param_leaves = jax.tree.leaves(abstract_params)
    sharding_leaves = params_def.flatten_up_to(param_shardings)
    by_shape: dict[tuple, Any] = {}
    for leaf, sharding in zip(param_leaves, sharding_leaves):
        by_shape.setdefault((tuple(leaf.shape), str(leaf.dtype)), sharding)

    def is_params_like(node):
        if params_def.num_leaves <= 1:
            return False  # a lone leaf matches anything; let the shape rule decide
        try:
            return jax.tree.structure(node) == params_def
        except Exception:
            return False

    def assign(node):
        if is_params_like(node):
            return jax.tree_util.tree_unflatten(
                jax.tree.structure(node), sharding_leaves)
        if node is None or not hasattr(node, "shape"):
            return node
        return by_shape.get((tuple(node.shape), str(node.dtype)), replicated)

    return jax.tree.map(assign, abstract_opt_state, is_leaf=is_params_like)


def optimizer_state_bytes(opt_state: Any) -> int:
    """Total bytes of the optimizer state's arrays."""
    if gj is not None and hasattr(gj, "optimizer_state_bytes"):
        return int(gj.optimizer_state_bytes(opt_state))
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(opt_state)))


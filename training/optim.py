"""Optimizer factory: schedule, clipping and the optimizer named in the config.

``adamw``          optax.adamw (the full-rank baseline)
``galore``         galore_jax.galore_adamw (GaLore with randomized SVD, ...)
``tensor_galore``  galore_jax.tensor_galore_adamw (Tucker projections)
``fira``           galore_jax.fira_adamw (GaLore + a norm-scaled full-rank residual)
``apollo``         galore_jax.apollo_adamw (the raw gradient, scaled per channel)
``apollo_mini``    galore_jax.apollo_mini_adamw (rank 1, one scale per matrix)
``optax_galore``   optax.contrib.galore (reference implementation, comparison)
``adafactor``      optax.adafactor (factored second moment; a memory-saving baseline)
``muon``           optax.contrib.muon (orthogonalized momentum on the hidden matrices)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import optax

import galore_jax as gj
from training.config import ConfigError, OptimizerConfig


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


def refresh_options(cfg: OptimizerConfig, seed: int) -> gj.RandomizedSVD | gj.ExactSVD:
    """``optimizer.svd`` as galore_jax's refresh object, seeded with the run's seed."""
    if cfg.svd == "exact":
        return gj.ExactSVD(seed=seed)
    svd = gj.RandomizedSVD() if cfg.svd == "randomized" else cfg.svd
    return dataclasses.replace(svd, seed=seed)


def _galore_options(cfg: OptimizerConfig, seed: int, labels: Any, dimension_numbers: Any) -> dict:
    """The arguments ``galore_adamw`` and ``tensor_galore_adamw`` share, from the config."""
    return dict(
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.scale,
        svd=refresh_options(cfg, seed),
        on_refresh=cfg.on_refresh,
        stagger=cfg.stagger,
        adam=cfg.adam,
        weight_decay=cfg.weight_decay,
        labels=gj.Labels(
            tree=labels, overrides=cfg.label_overrides, dimension_numbers=dimension_numbers
        ),
    )


def build_optimizer(
    cfg: OptimizerConfig,
    total_steps: int,
    *,
    dimension_numbers: Any = None,
    seed: int = 0,
    params: Any = None,
    scanned_model: Optional[gj.ScannedModel] = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The full update rule: clip -> optimizer(schedule) [on a float32 master copy].

    GaLore and Tensor-GaLore clip by the global norm themselves
    (``max_grad_norm``: the factor is applied in the low-rank space); other
    optimizers and clip modes get a clipping stage chained before.

    With ``cfg.layerwise`` the rule is for one group of params at a time (the
    embedding, one layer, the head: see ``galore_jax.layerwise``): no stacked
    axes, and no clipping (the layer-wise step clips).

    Args:
      cfg: the ``optimizer`` config section.
      total_steps: number of optimizer steps (sets the schedule's length).
      dimension_numbers: per-param ``galore_jax.DimensionNumbers`` (or None)
        naming stacked-layer batch axes; used by the GaLore optimizers.
      seed: seeds the randomized SVD.
      params: the (abstract) params; needed only by
        ``tensor_rank_mode: params`` to turn the rank into per-mode ranks.
      scanned_model: the model's layer structure; needed by layer-wise updates
        and by ``grad_clip_mode: layer``.

    Returns:
      ``(transformation, schedule)``; the schedule is also used for logging.
    """
    schedule = lr_schedule(cfg, total_steps)
    rank = tuple(cfg.rank) if isinstance(cfg.rank, list) else cfg.rank
    if cfg.name == "tensor_galore" and cfg.tensor_rank_mode == "mode":
        rank = _per_mode_fraction_ranks(cfg, params)
    labels = None
    if cfg.layerwise:  # the optimizer sees one part at a time: label it as the whole tree
        if cfg.name in ("galore", "tensor_galore", *LOW_RANK_ADAMW):
            labels = gj.labels.labels_by_path(
                _whole_tree_labels(cfg, params, dimension_numbers, rank, scanned_model)
            )
        dimension_numbers = None  # the optimizer sees one layer's matrices
    clip = _clip(cfg, scanned_model)
    # Our optimizers clip by the global norm themselves, in the low-rank space.
    fused_clip = cfg.name in FUSED_CLIP_OPTIMIZERS and cfg.grad_clip_mode == "global"
    max_grad_norm = cfg.grad_clip if fused_clip and clip is not None else None
    try:
        tx = _build(cfg, schedule, dimension_numbers, seed, rank, labels, max_grad_norm)
    except ConfigError:  # already names the config key
        raise
    except ValueError as e:  # the library names the bad argument and value
        raise ConfigError(f"optimizer: {e}") from None
    tx = tx if clip is None or fused_clip else optax.chain(clip, tx)
    if cfg.master_dtype is not None:
        tx = gj.with_master_weights(tx, cfg.master_dtype)
    return tx, schedule


# Fira and APOLLO: GaLore's labels (other N-D tensors: plain Adam), GaLore's options.
LOW_RANK_ADAMW = ("fira", "apollo", "apollo_mini")
# Optimizers whose factory takes `max_grad_norm` (the standard step's global-norm clip).
FUSED_CLIP_OPTIMIZERS = ("galore", "tensor_galore", *LOW_RANK_ADAMW)


def _whole_tree_labels(cfg: OptimizerConfig, params, dimension_numbers, rank, scanned_model):
    """The labels the whole-tree rule gives; Tensor-GaLore (layer-wise) Tucker-projects
    each layer's matrices, as a factor along the layer axis would need every layer."""
    if cfg.name in ("galore", *LOW_RANK_ADAMW):
        return gj.galore_labels(
            params,
            label_overrides=cfg.label_overrides,
            dimension_numbers=dimension_numbers,
            rank=1 if cfg.name == "apollo_mini" else rank,
            proj_type=cfg.proj_type,
            **({} if cfg.name == "galore" else {"tensors": "adam"}),
        )
    layers = f"^{scanned_model.layers_key}/"
    return gj.galore_labels(
        gj.scanned.one_layer_view(scanned_model, params),
        label_overrides={layers: "tensor_galore", **(cfg.label_overrides or {})},
        dimension_numbers=lambda tree: jax.tree.map(lambda _: None, tree),
        matrices="adam",
        tensor_rank=rank,
    )


def _clip(cfg: OptimizerConfig, scanned_model) -> Optional[optax.GradientTransformation]:
    """The clipping transform of a standard step (None: none, or the layer-wise step clips)."""
    if cfg.grad_clip == 0 or cfg.layerwise:
        return None
    if cfg.grad_clip_mode == "global":
        return optax.clip_by_global_norm(cfg.grad_clip)
    if cfg.grad_clip_mode == "previous_global":
        return gj.clipping.clip_by_previous_global_norm(cfg.grad_clip)
    if scanned_model is None:
        raise ConfigError(
            "optimizer.grad_clip_mode=layer needs a model of scanned layers "
            "(task: lm with model.scan_layers=true)"
        )
    return gj.clipping.clip_by_layer_norm(cfg.grad_clip, scanned_model)


def _build(
    cfg: OptimizerConfig,
    schedule: optax.Schedule,
    dimension_numbers: Any,
    seed: int,
    rank: Any,
    labels: Any = None,
    max_grad_norm: Optional[float] = None,
) -> optax.GradientTransformation:
    svd = cfg.svd if isinstance(cfg.svd, gj.RandomizedSVD) else None
    if cfg.name not in ("galore", "fira") and cfg.projector.bits != 32:
        raise ConfigError(
            f"optimizer.projector.bits={cfg.projector.bits} needs optimizer.name=galore or "
            f"fira (stored matrix projectors), got {cfg.name!r}"
        )
    matrix_svd = ("galore", *LOW_RANK_ADAMW)
    if cfg.name not in matrix_svd and svd is not None and svd.passes != 2:
        raise ConfigError(
            f"optimizer.svd.passes={svd.passes} applies to the matrix optimizers' randomized "
            f"SVD ({', '.join(matrix_svd)}), got {cfg.name!r}"
        )
    if svd is not None and svd.eigh is not None:
        if cfg.name not in matrix_svd:
            raise ConfigError(
                f"optimizer.svd.eigh={svd.eigh} applies to optimizer.name={'/'.join(matrix_svd)}"
                f", got {cfg.name!r}"
            )
        try:  # before the first step compiles (and before output_dir is written)
            gj.linalg.check_eigh_available(svd.eigh)
        except ValueError:
            raise ConfigError(
                f"optimizer.svd.eigh={svd.eigh} is not available on {jax.default_backend()} "
                "(XLA has Jacobi eigh on GPU / TPU only): set optimizer.svd.eigh=null"
            ) from None
    adam = cfg.adam
    if cfg.name == "adamw" and adam.bits == 8:
        tx = optax.chain(
            gj.scale_by_adam_8bit(b1=adam.b1, b2=adam.b2, eps=adam.eps),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(schedule),
        )
    elif cfg.name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=adam.b1,
            b2=adam.b2,
            eps=adam.eps,
            mu_dtype=adam.mu_dtype,
            weight_decay=cfg.weight_decay,
        )
    elif cfg.name == "galore":
        tx = gj.galore_adamw(
            schedule,
            **_galore_options(cfg, seed, labels, dimension_numbers),
            rank=rank,
            proj_type=cfg.proj_type,
            projector=cfg.projector,
            max_grad_norm=max_grad_norm,
            tensor=gj.Tucker(svd=gj.ExactSVD(seed=seed)),
        )
    elif cfg.name == "tensor_galore":
        tx = gj.tensor_galore_adamw(
            schedule,
            **_galore_options(cfg, seed, labels, None),
            rank=rank,
            max_grad_norm=max_grad_norm,
        )
    elif cfg.name in LOW_RANK_ADAMW:
        tx = _low_rank_adamw(cfg, schedule, dimension_numbers, seed, rank, labels, max_grad_norm)
    elif cfg.name == "optax_galore":
        if adam.bits != 32:
            raise ConfigError("optimizer.adam.bits=8 is not available for optax_galore")
        if isinstance(cfg.rank, float):
            raise ConfigError(f"optimizer.rank must be an int for optax_galore, got {cfg.rank!r}")
        if dimension_numbers is not None and any(
            d is not None for d in jax.tree.leaves(dimension_numbers, is_leaf=lambda x: x is None)
        ):
            raise ConfigError(
                "optimizer.name='optax_galore' cannot project stacked layer weights;"
                " set model.scan_layers=false"
            )
        base = optax.scale_by_adam(b1=adam.b1, b2=adam.b2, eps=adam.eps)
        # Same selection as the GaLore paper: matrices get GaLore, embeddings,
        # LM head and norms get plain AdamW.
        tx = optax.partition(
            {
                "galore": optax.contrib.galore(
                    schedule,
                    rank=cfg.rank,
                    update_proj_gap=cfg.update_proj_gap,
                    scale=cfg.scale,
                    weight_decay=cfg.weight_decay,
                    base_optimizer=base,
                ),
                "adam": optax.adamw(
                    schedule, b1=adam.b1, b2=adam.b2, eps=adam.eps, weight_decay=cfg.weight_decay
                ),
            },
            lambda params: gj.galore_labels(params, tensors="adam"),
        )
    elif cfg.name in ("adafactor", "muon"):
        tx = _baseline(cfg, schedule, dimension_numbers)
    else:  # config validation already restricts the names
        raise ConfigError(f"unknown optimizer.name {cfg.name!r}")
    return tx


# Moonlight's RMS match: Muon's update gets AdamW's typical RMS, so one learning
# rate (and one sweep) serves both Muon's matrices and AdamW's other params.
MUON_CONSISTENT_RMS = 0.2


def _baseline(cfg: OptimizerConfig, schedule, dimension_numbers) -> optax.GradientTransformation:
    """optax.adafactor / optax.contrib.muon as a JAX user would configure them."""
    if cfg.adam.bits != 32:
        raise ConfigError(f"optimizer.adam.bits=8 applies to adam-based optimizers, not {cfg.name}")
    if cfg.name == "adafactor":
        # optax's defaults (relative step size: lr multiplies each param's RMS).
        return optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)

    def muon_dimensions(params):
        # The matrices GaLore would project (stacked layers: the last two axes);
        # embeddings, head, norms and biases: AdamW, as Muon's authors do.
        labels = gj.galore_labels(params, dimension_numbers=dimension_numbers, tensors="adam")
        return jax.tree.map(
            lambda p, label: (
                optax.contrib.MuonDimensionNumbers(p.ndim - 2, p.ndim - 1)
                if label == "galore"
                else None
            ),
            params,
            labels,
        )

    adam = cfg.adam
    return optax.contrib.muon(
        schedule,
        weight_decay=cfg.weight_decay,
        adam_b1=adam.b1,
        adam_b2=adam.b2,
        adam_weight_decay=cfg.weight_decay,
        muon_weight_dimension_numbers=muon_dimensions,
        consistent_rms=MUON_CONSISTENT_RMS,
    )


def _low_rank_adamw(cfg, schedule, dimension_numbers, seed, rank, labels, max_grad_norm):
    """fira_adamw / apollo_adamw / apollo_mini_adamw from the config."""
    if cfg.projection is not None and cfg.name == "fira":
        raise ConfigError(
            f"optimizer.projection={cfg.projection} applies to apollo / apollo_mini; fira "
            "projects on optimizer.svd's singular vectors"
        )
    options = _galore_options(cfg, seed, labels, dimension_numbers)
    if cfg.name != "fira" and cfg.projection != "svd":
        options["svd"] = gj.apollo.RandomProjection(seed=seed)
    common = dict(norm_growth_limit=cfg.norm_growth_limit, max_grad_norm=max_grad_norm)
    if cfg.name == "fira":
        return gj.fira_adamw(
            schedule,
            **options,
            **common,
            rank=rank,
            proj_type=cfg.proj_type,
            projector=cfg.projector,
        )
    del options["scale"]
    if cfg.name == "apollo_mini":
        return gj.apollo_mini_adamw(schedule, **options, **common, scale=cfg.apollo_scale or 128.0)
    return gj.apollo_adamw(
        schedule,
        **options,
        **common,
        rank=rank,
        proj_type=cfg.proj_type,
        scale=cfg.apollo_scale or 1.0,
        scale_type=cfg.scale_type,
    )


def _per_mode_fraction_ranks(cfg: OptimizerConfig, params: Any) -> Any:
    """Deprecated ``tensor_rank_mode: mode``: a float rank as that fraction of every
    mode, i.e. the per-mode tuple (rank, ..., rank) of the projected tensors."""
    if not isinstance(cfg.rank, float) or params is None:
        return cfg.rank
    labels = gj.galore_labels(
        params, label_overrides=cfg.label_overrides, matrices="adam", tensors="tensor_galore"
    )
    ndims = {
        len(p.shape)
        for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
        if label == "tensor_galore"
    }
    if len(ndims) > 1:
        raise ConfigError(
            "optimizer.tensor_rank_mode='mode' needs every Tucker-projected tensor to have "
            f"one number of modes, got {sorted(ndims)}; use tensor_rank_mode='params' or a "
            "per-mode list"
        )
    return (cfg.rank,) * ndims.pop() if ndims else cfg.rank

"""Training configuration: typed dataclasses, YAML loading, ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config`` reads a YAML file, applies
command-line overrides such as ``optimizer.lr=3e-4`` (dotted keys reach into
sections, values are parsed as YAML scalars), and checks every key and type.
Any problem raises :class:`ConfigError` with one readable sentence; ``train.py``
prints it as ``error: ...`` and exits with status 2, so a typo never costs a
traceback or a half-started run.

Checks that need the machine (device count) or the model (which dims get
sharded) live in :func:`validate_for_devices` and in ``training.mesh``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is printed as-is."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that understands ``3e-4``."""
    return yaml.load(text, Loader=_YamlLoader)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class LlamaModelConfig:
    """LLaMA shape for ``task: lm``; mirrors ``models.llama.LlamaConfig``.

    ``vocab_size: null`` takes the tokenizer's vocabulary size rounded up to a
    multiple of ``vocab_multiple`` (so the vocab dim splits over mesh axes;
    the padding ids are never targets).
    """

    vocab_size: Optional[int] = None
    vocab_multiple: int = 64
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: same as num_heads (no GQA)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    scan_layers: bool = True  # stack layers on a leading axis and scan them
    remat: bool = False  # recompute activations in the backward pass
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_implementation: Optional[Literal["xla", "cudnn"]] = None


@dataclasses.dataclass
class TextDataConfig:
    """Token data for ``task: lm``.

    ``source``: ``builtin`` (the embedded Python-stdlib corpus), ``text`` (a
    UTF-8 file or a directory of ``*.txt``), ``jsonl`` (one JSON object per line,
    text under ``jsonl_field``) or ``bin`` (a pre-tokenized token array). The
    tokenizer is ``byte`` or a path to a Hugging Face ``tokenizer.json``.
    """

    source: Literal["builtin", "text", "jsonl", "bin"] = "builtin"
    path: Optional[str] = None
    tokenizer: str = "byte"
    jsonl_field: str = "text"
    bin_dtype: str = "uint16"
    val_fraction: float = 0.05
    max_corpus_bytes: Optional[int] = None  # cap on the builtin corpus (fast tests)


@dataclasses.dataclass
class FNOModelConfig:
    """Fourier Neural Operator shape for ``task: fno``; mirrors ``models.fno.FNOConfig``.

    The spatial dimension comes from the data (burgers: 1-D, darcy: 2-D).
    ``modes`` is an int (all axes) or a list with one entry per axis; in 2-D,
    ``modes[0]`` frequencies are kept on each side of the full-FFT axis, so
    the resolution must be >= 2 * modes[0] (and >= 2 * (modes[1] - 1)).
    """

    width: int = 32
    modes: Union[int, list] = 12
    num_layers: int = 4
    lifting_channels: Optional[int] = None  # None: one linear lifting layer
    projection_channels: int = 128
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    append_grid: bool = True  # append grid coordinates to the input channels
    padding: int = 0  # zero points appended per spatial axis (non-periodic problems)
    param_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass
class PDEDataConfig:
    """PDE data for ``task: fno``, generated at start-up by ``training.pde``.

    ``dataset``: ``burgers`` (1-D viscous Burgers, ``u(., 0) -> u(., t_final)``)
    or ``darcy`` (2-D Darcy flow, permeability -> pressure). ``n_train + n_test``
    samples are drawn from ``seed`` (fixed, independent of the run's seed, so
    runs with different model seeds or optimizers see the same data) and split.
    Inputs and outputs are normalised with ``UnitGaussianNormalizer`` fitted on
    the training split (``pointwise``: one mean/std per grid point, as in the
    FNO paper; otherwise per channel). The whole test split is evaluated
    (``eval_batches`` is not used) and reported as ``val_l2``, the mean
    relative L2 error.
    """

    dataset: Literal["burgers", "darcy"] = "darcy"
    n_train: int = 256
    n_test: int = 64
    resolution: int = 32
    seed: int = 0
    viscosity: float = 0.1  # burgers: nu (the FNO paper's 0.1; 0.01 has steeper fronts)
    t_final: float = 1.0  # burgers: T
    pointwise_normalizer: bool = False


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer and schedule.

    ``name``: ``adamw`` (optax.adamw), ``galore`` (galore_jax.galore_adamw),
    ``tensor_galore`` (galore_jax.tensor_galore_adamw) or ``optax_galore``
    (optax.contrib.galore, for comparison). The schedule warms up linearly over
    ``warmup_fraction`` of the steps, then follows a cosine down to
    ``final_lr_fraction * lr`` (the GaLore paper uses 0.1 and 0.1).
    """

    name: Literal["adamw", "galore", "tensor_galore", "optax_galore"] = "adamw"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.1
    # GaLore options (ignored by adamw).
    rank: Union[int, float] = 128
    # How tensor_galore reads a float rank: "mode" keeps that fraction of every
    # mode (galore_jax's meaning: 0.25 on a 4-D tensor keeps 1/256 of it);
    # "params" picks per-mode ranks round(c * d_k) so the Tucker core plus
    # factors hold that fraction of the tensor's entries (tensorly's meaning,
    # used by the Tensor-GaLore paper's code: 0.25 keeps ~0.7 of each mode of a
    # 4-D tensor). "params" needs the projected tensors to share one shape.
    tensor_rank_mode: Literal["mode", "params"] = "mode"
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    svd: Literal["randomized", "exact"] = "randomized"
    oversample: int = 8
    power_iters: int = 1
    warm_start: bool = True
    on_refresh: Literal["keep", "reset", "project"] = "keep"
    stagger: bool = False
    # regex on the '/'-joined param path -> galore | tensor_galore | adam,
    # e.g. {"lm_head": "galore"}; the first match wins over the default rule
    # (matrices -> galore; embeddings, LM head, norms -> adam).
    label_overrides: Optional[dict] = None


@dataclasses.dataclass
class MeshConfig:
    """Device mesh: axis sizes (one may be -1 = all remaining devices) and mode.

    ``kind``: ``auto`` lets the XLA partitioner choose intermediate shardings;
    ``explicit`` makes shardings part of the array types (jax's sharding-in-types).
    ``rules`` maps the model's logical axis names to mesh axes, as a list of
    ``[logical_name, mesh_axis | [mesh_axes] | null]``; null uses the model's
    default rules.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    kind: Literal["auto", "explicit"] = "auto"
    rules: Optional[list] = None


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpointing under ``<output_dir>/checkpoints``.

    ``every``: save every N steps (0: only at the end / on interrupt). A run
    whose output_dir already holds checkpoints resumes from the latest one
    unless ``resume: false``.
    """

    every: int = 100
    max_to_keep: int = 3
    async_save: bool = True
    resume: bool = True


@dataclasses.dataclass
class DistributedConfig:
    """Multi-host setup; empty fields fall back to JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment."""

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclasses.dataclass
class Config:
    """Everything a run needs. ``model`` and ``data`` depend on ``task``."""

    task: Literal["lm", "fno"] = "lm"
    output_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000  # optimizer steps (the LR schedule spans these)
    # Stop this invocation after this step (with a checkpoint); running again
    # resumes. For time-boxed jobs and resume tests; null runs to `steps`.
    stop_after: Optional[int] = None
    batch_size: int = 16  # global sequences per optimizer step
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must divide)
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic validation
    eval_batches: int = 4
    progress_bar: bool = True
    tensorboard: bool = False
    model: Any = dataclasses.field(default_factory=LlamaModelConfig)
    data: Any = dataclasses.field(default_factory=TextDataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(
        default_factory=DistributedConfig
    )


# Which dataclasses type the task-dependent sections. A new task (e.g. operator
# learning) registers its own model/data sections here.
TASK_SECTIONS: dict[str, dict[str, type]] = {
    "lm": {"model": LlamaModelConfig, "data": TextDataConfig},
    "fno": {"model": FNOModelConfig, "data": PDEDataConfig},
}


# ---------------------------------------------------------------------------
# Building a config from plain data
# ---------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """Human-readable name of a field annotation (``int``, ``int or null``...)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        names = [
            "null" if a is type(None) else _type_name(a)
            for a in typing.get_args(annotation)
        ]
        return " or ".join(names)
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks ``value`` against ``annotation``; returns it (ints widen to float).

    Raises:
      ConfigError: naming the key, the expected type and the offending value.
    """
    origin = typing.get_origin(annotation)
    bad = ConfigError(
        f"config key '{key}' expects {_type_name(annotation)}, got {value!r}"
        f" ({type(value).__name__})"
    )
    if annotation is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(annotation) and not isinstance(value, bool):
            return value
        raise bad
    if origin in (Union, types.UnionType):
        members = typing.get_args(annotation)
        if value is None:
            if type(None) in members:
                return None
            raise bad
        # Prefer an exact type match (int stays int in Union[int, float]).
        for member in members:
            if member is not type(None) and type(value) is member:
                return value
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        raise bad
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if annotation is str:
        if isinstance(value, str):
            return value
        raise bad
    if annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise bad


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking keys and value types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping,"
            f" got {raw!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in fields:
            valid = [f"{prefix}{f}" for f in fields]
            raise ConfigError(f"unknown config key '{key}'{_closest(key, valid)}")
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Builds a checked :class:`Config` from nested plain data (e.g. parsed YAML)."""
    raw = dict(raw or {})
    task = raw.get("task", Config.task)
    if task not in TASK_SECTIONS:
        raise ConfigError(
            f"config key 'task' expects one of {sorted(TASK_SECTIONS)}, got {task!r}"
        )
    sections = TASK_SECTIONS[task]
    # Task-dependent sections are typed by the task's own dataclasses.
    typed = {name: _build(cls, raw.pop(name, None), f"{name}.")
             for name, cls in sections.items()}
    config = _build(Config, raw, "")
    for name, value in typed.items():
        setattr(config, name, value)
    return config


def config_to_dict(config: Any) -> dict:
    """Plain nested dict (JSON/YAML-safe) of a config."""
    return dataclasses.asdict(config)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' must look like key=value (e.g. optimizer.lr=3e-4)"
        )
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = parse_yaml(value_text) if value_text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Returns ``raw`` with dotted ``key=value`` overrides applied (unchecked)."""
    raw = _deep_copy(raw)
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override '{text}': '{part}' is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return raw


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or starts from defaults), applies overrides, checks it.

    Args:
      path: YAML file, or None for the defaults.
      overrides: ``key=value`` strings; dotted keys reach into sections.

    Returns:
      The checked :class:`Config`.

    Raises:
      ConfigError: unreadable file, unknown key, wrong type or bad value.
    """
    raw: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = parse_yaml(f.read()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a YAML mapping at the top level")
    config = config_from_dict(apply_overrides(raw, list(overrides)))
    check_values(config)
    return config


# ---------------------------------------------------------------------------
# Value checks
# ---------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_values(config: Config) -> None:
    """Range and consistency checks that need neither devices nor the model."""
    _require(config.steps > 0, f"steps must be > 0, got {config.steps}")
    _require(config.stop_after is None or config.stop_after > 0,
             f"stop_after must be > 0, got {config.stop_after}")
    _require(config.batch_size > 0, f"batch_size must be > 0, got {config.batch_size}")
    _require(config.seq_len > 0, f"seq_len must be > 0, got {config.seq_len}")
    _require(config.grad_accum_steps > 0,
             f"grad_accum_steps must be > 0, got {config.grad_accum_steps}")
    _require(config.batch_size % config.grad_accum_steps == 0,
             f"batch_size ({config.batch_size}) must be divisible by "
             f"grad_accum_steps ({config.grad_accum_steps})")
    _require(config.log_every > 0, f"log_every must be > 0, got {config.log_every}")
    _require(config.eval_every >= 0, f"eval_every must be >= 0, got {config.eval_every}")
    _require(config.eval_batches > 0,
             f"eval_batches must be > 0, got {config.eval_batches}")
    _require(bool(config.output_dir), "output_dir must not be empty")

    opt = config.optimizer
    _require(opt.lr > 0, f"optimizer.lr must be > 0, got {opt.lr}")
    _require(0 <= opt.warmup_fraction < 1,
             f"optimizer.warmup_fraction must be in [0, 1), got {opt.warmup_fraction}")
    _require(0 <= opt.final_lr_fraction <= 1,
             f"optimizer.final_lr_fraction must be in [0, 1], got {opt.final_lr_fraction}")
    _require(opt.grad_clip >= 0, f"optimizer.grad_clip must be >= 0, got {opt.grad_clip}")
    _require(opt.update_proj_gap > 0,
             f"optimizer.update_proj_gap must be > 0, got {opt.update_proj_gap}")
    if isinstance(opt.rank, float):
        _require(0 < opt.rank <= 1,
                 f"optimizer.rank as a fraction must be in (0, 1], got {opt.rank}")
    else:
        _require(opt.rank > 0, f"optimizer.rank must be > 0, got {opt.rank}")

    for axis in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, axis)
        _require(size == -1 or size > 0,
                 f"mesh.{axis} must be a positive size or -1 (the rest), got {size}")
    _require([config.mesh.data, config.mesh.fsdp, config.mesh.tensor].count(-1) <= 1,
             "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if config.mesh.rules is not None:
        for rule in config.mesh.rules:
            _require(isinstance(rule, (list, tuple)) and len(rule) == 2
                     and isinstance(rule[0], str),
                     f"mesh.rules entries must be [logical_name, mesh_axes], got {rule!r}")

    ckpt = config.checkpoint
    _require(ckpt.every >= 0, f"checkpoint.every must be >= 0, got {ckpt.every}")
    _require(ckpt.max_to_keep > 0,
             f"checkpoint.max_to_keep must be > 0, got {ckpt.max_to_keep}")

    if config.task == "lm":
        _check_lm(config)
    elif config.task == "fno":
        _check_fno(config)


def _check_lm(config: Config) -> None:
    model, data = config.model, config.data
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "max_seq_len"):
        value = getattr(model, name)
        _require(value > 0, f"model.{name} must be > 0, got {value}")
    kv_heads = model.num_kv_heads or model.num_heads
    _require(model.num_heads % kv_heads == 0,
             f"model.num_heads ({model.num_heads}) must be divisible by "
             f"model.num_kv_heads ({kv_heads})")
    _require(model.hidden_size % model.num_heads == 0
             and (model.hidden_size // model.num_heads) % 2 == 0,
             f"model.hidden_size ({model.hidden_size}) must split over "
             f"model.num_heads ({model.num_heads}) into an even head size")
    _require(model.vocab_multiple > 0,
             f"model.vocab_multiple must be > 0, got {model.vocab_multiple}")
    _require(config.seq_len <= model.max_seq_len,
             f"seq_len ({config.seq_len}) is longer than the model's positions "
             f"(model.max_seq_len={model.max_seq_len})")
    _require(0 < data.val_fraction < 1,
             f"data.val_fraction must be in (0, 1), got {data.val_fraction}")
    if data.source != "builtin":
        _require(data.path is not None,
                 f"data.path is required for data.source={data.source!r}")


def _check_fno(config: Config) -> None:
    model, data = config.model, config.data
    for name in ("width", "num_layers", "projection_channels"):
        value = getattr(model, name)
        _require(value > 0, f"model.{name} must be > 0, got {value}")
    _require(model.lifting_channels is None or model.lifting_channels > 0,
             f"model.lifting_channels must be > 0 or null, got {model.lifting_channels}")
    _require(model.padding >= 0, f"model.padding must be >= 0, got {model.padding}")
    dim = 1 if data.dataset == "burgers" else 2
    modes = model.modes if isinstance(model.modes, list) else [model.modes] * dim
    _require(len(modes) == dim
             and all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in modes),
             f"model.modes must be a positive int or a list of {dim} positive ints for "
             f"data.dataset={data.dataset!r}, got {model.modes!r}")
    for name in ("n_train", "n_test", "resolution"):
        value = getattr(data, name)
        _require(value > 0, f"data.{name} must be > 0, got {value}")
    _require(data.seed >= 0, f"data.seed must be >= 0, got {data.seed}")
    _require(data.n_train >= config.batch_size,
             f"data.n_train ({data.n_train}) must be >= batch_size ({config.batch_size})")
    res = data.resolution
    if data.dataset == "burgers":
        _require(res % 2 == 0, f"data.resolution must be even for burgers, got {res}")
        _require(data.viscosity > 0, f"data.viscosity must be > 0, got {data.viscosity}")
        _require(data.t_final > 0, f"data.t_final must be > 0, got {data.t_final}")
        n = res + model.padding  # the spectral layers see the padded grid
        _require(modes[0] <= n // 2 + 1,
                 f"model.modes ({modes[0]}) must be <= {n // 2 + 1}, the rfft "
                 f"frequencies of the grid (data.resolution={res}, "
                 f"model.padding={model.padding})")
    else:
        _require(res >= 3, f"data.resolution must be >= 3 for darcy, got {res}")
        n = res + model.padding  # the spectral layers see the padded grid
        _require(2 * modes[0] <= n and modes[1] <= n // 2 + 1,
                 f"model.modes ({model.modes!r}) do not fit the grid: need "
                 f"2 * modes[0] <= {n} and modes[1] <= {n // 2 + 1} "
                 f"(data.resolution={res}, model.padding={model.padding})")


def resolve_mesh_shape(config: Config, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled in; checks they multiply to ``num_devices``.

    Raises:
      ConfigError: when the sizes do not fit the devices.
    """
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp,
             "tensor": config.mesh.tensor}
    fixed = 1
    for size in sizes.values():
        if size != -1:
            fixed *= size
    described = ", ".join(f"{k}={v}" for k, v in sizes.items())
    if -1 in sizes.values():
        _require(num_devices % fixed == 0,
                 f"mesh sizes ({described}) do not divide the {num_devices} devices")
        sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    else:
        _require(fixed == num_devices,
                 f"mesh sizes ({described}) use {fixed} devices but "
                 f"{num_devices} are available")
    return sizes


def validate_for_devices(config: Config, num_devices: int) -> dict[str, int]:
    """Device-dependent checks; returns the resolved mesh shape.

    The global batch (per micro-batch) is split over the ``data`` and ``fsdp``
    axes, and attention heads over ``tensor``.
    """
    shape = resolve_mesh_shape(config, num_devices)
    batch_shards = shape["data"] * shape["fsdp"]
    micro_batch = config.batch_size // config.grad_accum_steps
    _require(micro_batch % batch_shards == 0,
             f"micro-batch size batch_size/grad_accum_steps = {micro_batch} must be "
             f"divisible by mesh data*fsdp = {batch_shards}")
    if config.task == "lm":
        model = config.model
        kv_heads = model.num_kv_heads or model.num_heads
        for name, value in (("model.num_heads", model.num_heads),
                            ("model.num_kv_heads", kv_heads)):
            _require(value % shape["tensor"] == 0,
                     f"{name} ({value}) must be divisible by mesh.tensor "
                     f"({shape['tensor']})")
    return shape

"""Training configuration: pydantic dataclasses, YAML loading, ``key=value`` overrides.

A config is a tree of pydantic dataclasses (so ``dataclasses.replace`` and
``dataclasses.asdict`` work, and attribute assignment is validated). This
module holds what every run has (:class:`Config`: ``optimizer``, ``mesh``,
``checkpoint``, ``distributed`` and the top-level keys) and the loading
machinery; it names no task. Each task subclasses :class:`Config` with its own
``model`` and ``data`` sections and a ``build_task()`` (``tasks/<name>/config.py``),
and :class:`TaskConfigs` tells them apart by the ``task`` key:
``tasks.registry`` builds one and passes it to :func:`load_config` /
:func:`config_from_dict` (``tasks.registry.load_config`` does both).

``load_config`` reads a YAML file, applies command-line overrides such as
``optimizer.lr=3e-4`` (dotted keys reach into sections, values are parsed as
YAML scalars), and validates. Any problem raises :class:`ConfigError` with one
readable line; ``train.py`` prints it as ``error: ...`` and exits with status 2,
so a typo never costs a traceback.

Checks that need the machine (device count) or the model (which dims get
sharded) live in :func:`validate_for_devices` and in ``training.mesh``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import sys
import typing
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Mapping, Optional, Union

import annotated_types as at
import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

import galore_jax as gj

if TYPE_CHECKING:
    from training.task import Task


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is printed as-is."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that understands ``3e-4``."""
    return yaml.load(text, Loader=_YamlLoader)


# Strict scalars: no bool as int, no "3" as int, no 1.5 as int; ints widen to float.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Pos = Annotated[int, Strict(), Field(gt=0)]
_SECTION = ConfigDict(extra="forbid", validate_assignment=True)


def _fail(condition: Any, message: str) -> None:
    """Raises ConfigError (a ValueError: inside a validator pydantic reports it)."""
    if condition:
        raise ConfigError(message)


class _Section:
    """Base of every section: ``key:`` with nothing under it (YAML null) is ``{}``."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


# The optimizer sections that are galore_jax option objects (their fields are the keys).
OPTION_SECTIONS = {
    "adam": gj.AdamOptions,
    "svd": gj.RandomizedSVD,
    "projector": gj.ProjectorStorage,
}
_SEEDED_BY_THE_RUN = ("seed",)


def _option_object(key: str, option: type, given: dict) -> Any:
    """``optimizer.<key>``'s mapping as an ``option`` object; errors name the config key."""
    fields = [f.name for f in dataclasses.fields(option)]
    for name in given:
        if name not in fields:
            unknown = f"optimizer.{key}.{name}"
            valid = [f"optimizer.{key}.{f}" for f in fields]
            raise ConfigError(f"unknown config key '{unknown}'{_closest(unknown, valid)}")
    if given.get("seed", 0) != 0:  # config.yaml holds seed: 0
        raise ConfigError(
            f"optimizer.{key}.seed={given['seed']!r}: the run's top-level seed seeds the "
            "refresh; set seed instead"
        )
    try:
        return option(**given)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).replace(f"{option.__name__}.", f"optimizer.{key}.")) from None


# galore-jax 0.2.0's flat optimizer keys -> (section, field) in 0.3.0.
MOVED_OPTIMIZER_KEYS = {
    "b1": ("adam", "b1"),
    "b2": ("adam", "b2"),
    "eps": ("adam", "eps"),
    "moment_bits": ("adam", "bits"),
    "oversample": ("svd", "oversample"),
    "power_iters": ("svd", "power_iters"),
    "warm_start": ("svd", "warm_start"),
    "intermediate_passes": ("svd", "passes"),
    "eigh_implementation": ("svd", "eigh"),
    "projector_bits": ("projector", "bits"),
}


def _spelled_out(optimizer: dict) -> dict:
    """Option sections as full mappings (``svd: randomized`` and a partial ``adam:``
    spelled out with the defaults), so that configs written either way compare equal
    and ``optimizer.svd.passes=1`` can reach into a config that says ``randomized``."""
    optimizer = dict(optimizer)
    for key, option in OPTION_SECTIONS.items():
        given = optimizer.get(key)
        if key == "svd" and given == "randomized":
            given = {}
        if isinstance(given, dict):
            optimizer[key] = {**dataclasses.asdict(option()), **given}
    return optimizer


def migrate_moved_keys(raw: Mapping) -> tuple[dict, list[str]]:
    """A raw config with 0.2.0's flat optimizer keys moved into their sections, and one
    line naming the moves (empty if none). Sketch options given with ``svd: exact``
    are dropped, as 0.2.0 ignored them."""
    raw = dict(raw or {})
    optimizer = raw.get("optimizer")
    if not isinstance(optimizer, dict):
        return raw, []
    if not set(optimizer) & set(MOVED_OPTIMIZER_KEYS):
        raw["optimizer"] = _spelled_out(optimizer)
        return raw, []
    optimizer = dict(optimizer)
    moved = []
    for old, (section, field) in MOVED_OPTIMIZER_KEYS.items():
        if old not in optimizer:
            continue
        value = optimizer.pop(old)
        moved.append(f"optimizer.{old} -> optimizer.{section}.{field}")
        target = optimizer.get(section)
        if section == "svd" and target in (None, "randomized"):
            target = {}
        if section == "svd" and target == "exact":
            continue
        if target is None:
            target = {}
        if not isinstance(target, dict):
            raise ConfigError(
                f"optimizer.{old} (moved to optimizer.{section}.{field}) cannot be combined "
                f"with optimizer.{section}: {target!r}"
            )
        if field in target and target[field] != value:
            raise ConfigError(
                f"optimizer.{old} and optimizer.{section}.{field} are the same setting, given "
                f"twice ({value!r} and {target[field]!r}); keep optimizer.{section}.{field}"
            )
        optimizer[section] = {**target, field: value}
    raw["optimizer"] = optimizer
    note = "config keys of galore-jax 0.2.0 moved (they still work for now): " + ", ".join(moved)
    return raw, [note]


@dataclass(config=_SECTION)
class OptimizerConfig(_Section):
    """Optimizer and schedule.

    ``name``: ``adamw`` (optax.adamw), ``galore`` (galore_jax.galore_adamw),
    ``tensor_galore`` (galore_jax.tensor_galore_adamw), ``fira``
    (galore_jax.fira_adamw), ``apollo`` / ``apollo_mini`` (galore_jax.apollo_adamw /
    apollo_mini_adamw), ``optax_galore`` (optax.contrib.galore, for comparison), or
    the memory-saving baselines a JAX user would pick instead: ``adafactor``
    (optax.adafactor) and ``muon`` (optax.contrib.muon on the hidden matrices,
    AdamW on the rest; RMS-matched so it shares AdamW's learning rate).
    The schedule warms up linearly over ``warmup_fraction`` of the steps, then
    follows a cosine down to ``final_lr_fraction * lr`` (the GaLore paper uses 0.1
    and 0.1).
    """

    name: Literal[
        "adamw",
        "galore",
        "tensor_galore",
        "fira",
        "apollo",
        "apollo_mini",
        "optax_galore",
        "adafactor",
        "muon",
    ] = "adamw"
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = 0.0
    grad_clip: Float = Field(1.0, ge=0)  # clip threshold; 0 disables
    # What grad_clip bounds: "global" (this step's global norm), "layer" (each
    # layer's, the embedding's and the head's own norm) or "previous_global" (the
    # factor of the previous step's global norm). Layer-wise updates cannot use
    # "global": no step of theirs ever holds every gradient at once.
    grad_clip_mode: Literal["global", "layer", "previous_global"] = "global"
    # Run the optimizer inside the backward pass, one layer at a time (no full
    # gradient tree; LLaMA with model.scan_layers, one micro-batch per step).
    layerwise: Bool = False
    # GaLore with grad_accum_steps > 1 or mesh.data > 1: micro-batches summed, and
    # replicas averaged, as each projected matrix's low-rank projection (exact; a
    # refresh step makes extra passes over the micro-batches). null (default): wherever
    # that is exact (optimizer.name=galore, a randomized refresh, grad_clip=0, an Auto
    # mesh); false: also with grad_clip > 0 (the clip then bounds the norm in the
    # subspace); true: always the full-size sum.
    full_size_gradients: Optional[Bool] = None
    # Where gradients sum in the subspace (standard and layer-wise steps): a refresh
    # step's passes run in this many parts of the projected matrices, one after
    # another. Each part's range-finder buffers are held alone; each part makes its
    # own passes (with the default refresh, 1 + 5 x refresh_parts backward passes).
    refresh_parts: int = Field(2, ge=1)
    warmup_fraction: Float = Field(0.1, ge=0, lt=1)
    final_lr_fraction: Float = Field(0.1, ge=0, le=1)
    # GaLore options (ignored by adamw). An int rank, or a float fraction in (0, 1]:
    # of the projected side for galore; of each tensor's entries for tensor_galore
    # (the Tucker core plus factors hold that fraction, as in neuraloperator's
    # Tensor-GaLore and galore_jax). tensor_galore also takes a per-mode list
    # (ints, float fractions of that mode, or null to leave a mode unprojected).
    rank: Union[Int, Float, list[Optional[Union[Int, Float]]]] = 128
    # Deprecated: "mode" reads a float tensor_galore rank as that fraction of every
    # mode (what galore_jax 0.2 did; the same as a list of one fraction per mode).
    tensor_rank_mode: Literal["mode", "params"] = "params"
    update_proj_gap: Pos = 200
    scale: Float = 0.25
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    on_refresh: Literal["keep", "reset", "project"] = "keep"
    stagger: Bool = False
    # Fira / APOLLO: the norm-growth limiter's largest growth of the full-rank
    # term's norm per step (null: off); APOLLO's scale per row / column ("channel")
    # or per matrix ("tensor"; apollo_mini always); APOLLO's scale (the update is
    # multiplied by its square root; null: 1 for apollo, 128 for apollo_mini: not
    # `scale`, which is GaLore's and Fira's alpha); APOLLO's projection, "random"
    # (null: the default, no SVD, a key stored) or "svd" (optimizer.svd's, stored).
    norm_growth_limit: Optional[Float] = Field(1.01, gt=1)
    scale_type: Literal["channel", "tensor"] = "channel"
    apollo_scale: Optional[Float] = Field(None, gt=0)
    projection: Optional[Literal["random", "svd"]] = None
    # The option objects of galore_jax, one section each (keys = their fields):
    # adam: gj.AdamOptions (b1, b2, eps, bits: 32 | 8 for block-wise 8-bit moments;
    #   every optimizer but optax_galore);
    # svd: "randomized" | "exact", or the fields of gj.RandomizedSVD (oversample,
    #   power_iters, warm_start, passes, eigh); the run's seed seeds it;
    # projector: gj.ProjectorStorage (bits: 32 | 8 | 4, group_size; galore only).
    adam: gj.AdamOptions = dataclasses.field(default_factory=gj.AdamOptions)
    svd: Union[Literal["exact"], gj.RandomizedSVD] = dataclasses.field(
        default_factory=gj.RandomizedSVD
    )
    projector: gj.ProjectorStorage = dataclasses.field(default_factory=gj.ProjectorStorage)
    # A float32 copy of 16-bit params (model.param_dtype bfloat16) that
    # the optimizer updates (galore_jax.with_master_weights); null: none.
    master_dtype: Optional[Literal["float32"]] = None
    # regex on the '/'-joined param path -> galore | tensor_galore | adam,
    # e.g. {"lm_head": "galore"}; the first match wins over the default rule
    # (matrices -> galore; embeddings, LM head, norms -> adam).
    label_overrides: Optional[dict[Str, Str]] = None

    @model_validator(mode="before")
    @classmethod
    def _option_objects(cls, value: Any) -> Any:
        """The option sections as galore_jax's objects; their errors name the key."""
        if not isinstance(value, dict):
            return value
        value = dict(value)
        svd = value.get("svd")
        if svd == "randomized":  # the shorthand
            value["svd"] = {}
        elif not isinstance(svd, (dict, gj.RandomizedSVD)) and svd not in (None, "exact"):
            raise ConfigError(
                "optimizer.svd must be 'randomized', 'exact' or a mapping of "
                f"gj.RandomizedSVD's fields (oversample, power_iters, ...), got {svd!r}"
            )
        for key, option in OPTION_SECTIONS.items():
            given = value.get(key)
            if isinstance(given, dict):
                value[key] = _option_object(key, option, given)
        return value

    @model_validator(mode="after")
    def _rank(self) -> OptimizerConfig:
        if isinstance(self.rank, list):
            _fail(
                self.name != "tensor_galore",
                f"optimizer.rank as a per-mode list is for tensor_galore, got {self.rank} "
                f"with optimizer.name={self.name}",
            )
            _fail(not self.rank, "optimizer.rank as a per-mode list must not be empty")
            entries = [r for r in self.rank if r is not None]
        else:
            entries = [self.rank]
        for r in entries:
            if isinstance(r, float):
                _fail(not 0 < r <= 1, f"optimizer.rank as a fraction must be in (0, 1], got {r}")
            else:
                _fail(r <= 0, f"optimizer.rank must be > 0, got {r}")
        return self

    def subspace_refusal(self) -> Optional[str]:
        """Why these settings cannot sum gradients in GaLore's subspace, or None.

        The optimizer's own reasons, shared by the layer-wise config check and the
        standard step's choice (which adds the mesh's and the task's)."""
        if self.name != "galore":
            return f"optimizer.name={self.name} (only galore projects every matrix's gradient)"
        if self.svd == "exact":
            return "optimizer.svd=exact (an exact SVD needs the whole gradient)"
        if self.master_dtype is not None:
            return "optimizer.master_dtype set (master weights read the full gradient)"
        return None


@dataclass(config=_SECTION)
class MeshConfig(_Section):
    """Device mesh: axis sizes (one may be -1 = all remaining devices) and mode.

    ``kind``: ``auto`` lets the XLA partitioner choose intermediate shardings;
    ``explicit`` makes shardings part of the array types (jax's sharding-in-types).
    ``rules`` maps the model's logical axis names to mesh axes, as a list of
    ``[logical_name, mesh_axis | [mesh_axes] | null]``; null uses the model's
    default rules.
    """

    data: Int = -1
    fsdp: Int = 1
    tensor: Int = 1
    kind: Literal["auto", "explicit"] = "auto"
    rules: Optional[list[list]] = None

    @model_validator(mode="after")
    def _sizes(self) -> MeshConfig:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for axis, size in sizes.items():
            _fail(
                size != -1 and size <= 0,
                f"mesh.{axis} must be a positive size or -1 (the rest), got {size}",
            )
        _fail(
            list(sizes.values()).count(-1) > 1,
            "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1",
        )
        for rule in self.rules or ():
            _fail(
                len(rule) != 2 or not isinstance(rule[0], str),
                f"mesh.rules entries must be [logical_name, mesh_axes], got {rule!r}",
            )
        return self


@dataclass(config=_SECTION)
class CheckpointConfig(_Section):
    """Orbax checkpointing under ``<output_dir>/checkpoints``.

    ``every``: save every N steps (0: only at the end / on interrupt). A run
    whose output_dir already holds checkpoints resumes from the latest one
    unless ``resume: false``.
    """

    every: Int = Field(100, ge=0)
    max_to_keep: Pos = 3
    async_save: Bool = True
    resume: Bool = True


@dataclass(config=_SECTION)
class DistributedConfig(_Section):
    """Multi-host setup; empty fields fall back to JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment."""

    coordinator_address: Optional[Str] = None
    num_processes: Optional[Pos] = None
    process_id: Optional[Int] = Field(None, ge=0)


@dataclass(config=_SECTION)
class Config:
    """Everything a run needs except ``model`` and ``data``, whose types depend on
    ``task``: a loaded config is the task's subclass (``tasks.lm.config.LMConfig``,
    ``tasks.fno.config.FNOConfig``), which adds them, ``task: Literal[<name>]`` and
    :meth:`build_task`."""

    # Whether the task's model is embedding -> scanned layers -> head, what
    # optimizer.layerwise=true needs (the LM task's config sets it).
    scanned_layers: ClassVar[bool] = False

    task: Str  # the subclass fixes it: Literal["lm"] = "lm", ...
    output_dir: Str = Field("runs/default", min_length=1)
    seed: Int = 0
    steps: Pos = 1000  # optimizer steps (the LR schedule spans these)
    # Stop this invocation after this step (with a checkpoint); running again
    # resumes. For time-boxed jobs and resume tests; null runs to `steps`.
    stop_after: Optional[Pos] = None
    batch_size: Pos = 16  # global sequences per optimizer step
    grad_accum_steps: Pos = 1  # micro-batches per step (batch_size must divide)
    seq_len: Pos = 128
    log_every: Pos = 10
    eval_every: Int = Field(100, ge=0)  # 0 disables periodic validation
    eval_batches: Pos = 4
    progress_bar: Bool = True
    # A step (or its eval / save) that makes no progress this long ends the run with
    # an error instead of hanging; the first step (compilation) is not timed. 0: off.
    step_timeout_s: Float = Field(1800.0, ge=0)
    tensorboard: Bool = False
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _batch(self) -> Config:
        _fail(
            self.batch_size % self.grad_accum_steps != 0,
            f"batch_size ({self.batch_size}) must be divisible by "
            f"grad_accum_steps ({self.grad_accum_steps})",
        )
        return self

    @model_validator(mode="after")
    def _master(self) -> Config:
        param_dtype = getattr(self.model, "param_dtype", "float32")
        _fail(
            self.optimizer.master_dtype is not None and param_dtype == "float32",
            f"optimizer.master_dtype={self.optimizer.master_dtype} keeps a copy of 16-bit "
            "params; set model.param_dtype=bfloat16, or optimizer.master_dtype=null",
        )
        return self

    @model_validator(mode="after")
    def _layerwise(self) -> Config:
        opt = self.optimizer
        if not opt.layerwise:
            return self
        _fail(
            not self.scanned_layers,
            f"optimizer.layerwise=true needs a model of scanned layers (task: lm), "
            f"got task: {self.task}",
        )
        if self.grad_accum_steps > 1:  # micro-batches sum in GaLore's subspace, or not at all
            why = opt.subspace_refusal()
            if why is None and opt.full_size_gradients:
                why = "optimizer.full_size_gradients=true (layer-wise steps never sum at full size)"
            _fail(
                why is not None,
                f"optimizer.layerwise=true with grad_accum_steps={self.grad_accum_steps} sums "
                f"the micro-batches in GaLore's subspace, which cannot be done with {why}; "
                "change that, or set grad_accum_steps=1 and raise batch_size instead",
            )
        _fail(
            opt.grad_clip > 0 and opt.grad_clip_mode == "global",
            "optimizer.layerwise=true cannot clip by this step's global norm (it needs every "
            "gradient before any update); set optimizer.grad_clip_mode=layer or "
            "previous_global, or optimizer.grad_clip=0",
        )
        return self

    def build_task(self) -> Task:
        """The task (model, loss, data) this config describes; loads or generates its data.

        Raises:
          ConfigError: data that cannot be read, a model that does not fit it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not build a task")

    def check_mesh(self, mesh_shape: dict[str, int]) -> None:
        """The task's checks of the resolved mesh (:func:`validate_for_devices`); none here.

        Raises:
          ConfigError: a model dimension that does not split over its mesh axis.
        """


class TaskConfigs:
    """The config class of every task, told apart by the ``task`` key.

    Args:
      configs: ``{task name: Config subclass}``; each class's ``task`` field is
        ``Literal[<its name>]``.
      default: the task of a config without a ``task`` key.
    """

    def __init__(self, configs: Mapping[str, type[Config]], default: str):
        if default not in configs:
            raise ValueError(f"default task {default!r} is not one of {list(configs)}")
        self.configs, self.default = dict(configs), default
        self.adapter = TypeAdapter(
            Annotated[Union[tuple(self.configs.values())], Field(discriminator="task")]
        )


# ---------------------------------------------------------------------------
# Pydantic errors -> one line
# ---------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """Human-readable name of a field annotation (``int``, ``int or null``...)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    name = getattr(origin or annotation, "__name__", str(annotation))
    return f"{name} of {' to '.join(map(_type_name, args))}" if args else name


def _bounds(info: Any, ctx: dict) -> str:
    """``> 0``, ``in [0, 1)`` ... from the field's constraints (else the error's)."""
    found = {
        k: getattr(m, k)
        for m in info.metadata
        for k in ("gt", "ge", "lt", "le")
        if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le)) and hasattr(m, k)
    } or ctx
    if len(found) == 2:
        low, high = found.get("gt", found.get("ge")), found.get("lt", found.get("le"))
        return f"in {'(' if 'gt' in found else '['}{low}, {high}{')' if 'lt' in found else ']'}"
    return " and ".join(
        f"{dict(gt='>', ge='>=', lt='<', le='<=')[k]} {v}" for k, v in found.items()
    )


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _message(error: dict, raw: dict, tasks: TaskConfigs) -> str:
    """One line for one pydantic error: the dotted key, what it expects, the value."""
    kind, loc = error["type"], error["loc"][1:]  # loc[0] is the task tag
    if kind == "union_tag_invalid":
        return (
            f"config key 'task' expects one of {error['ctx']['expected_tags']}, got {raw['task']!r}"
        )
    cls, names, info, value = tasks.configs[raw["task"]], [], None, raw
    for part in loc:  # walk the loc down the fields; stops at union member tags
        fields = getattr(cls, "__pydantic_fields__", {})
        if part not in fields:
            break
        names.append(part)
        info, cls = fields[part], fields[part].annotation
        value = value.get(part) if isinstance(value, dict) else value
    key = ".".join(names)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        unknown = ".".join(map(str, loc[: len(names) + 1]))
        prefix = f"{key}." if key else ""
        valid = [prefix + f for f in getattr(cls, "__pydantic_fields__", {})]
        return f"unknown config key '{unknown}'{_closest(unknown, valid)}"
    if kind in ("value_error", "assertion_error"):
        return str(error["ctx"]["error"])
    if kind == "dataclass_type":
        return f"config section '{key}' must be a mapping, got {value!r}"
    if kind == "string_too_short":
        return f"{key} must not be empty"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        null = " or null" if type(None) in typing.get_args(info.annotation) else ""
        return f"{key} must be {_bounds(info, error['ctx'])}{null}, got {value}"
    return (
        f"config key '{key}' expects {_type_name(info.annotation)}, got {value!r}"
        f" ({type(value).__name__})"
    )


# ---------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------


def config_from_dict(raw: dict, tasks: TaskConfigs) -> Config:
    """Builds a validated config (the class ``tasks`` has for its ``task``) from nested
    plain data."""
    raw, _ = migrate_moved_keys(raw)
    raw.setdefault("task", tasks.default)
    try:
        return tasks.adapter.validate_python(raw)
    except ValidationError as e:
        message, *others = dict.fromkeys(_message(err, raw, tasks) for err in e.errors())
        raise ConfigError(message + (f" (and {len(others)} more)" if others else "")) from None


def config_to_dict(config: Any) -> dict:
    """Plain nested dict (JSON/YAML-safe) of a config."""
    return dataclasses.asdict(config)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optimizer.lr=3e-4)")
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
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: Optional[str], overrides: list[str], tasks: TaskConfigs) -> Config:
    """Reads a YAML config (or starts from defaults), applies overrides, validates.

    Args:
      path: YAML file, or None for the defaults.
      overrides: ``key=value`` strings; dotted keys reach into sections.
      tasks: the config class of each ``task`` (``tasks.registry.TASKS``).

    Returns:
      The validated config (the ``task``'s class, e.g. ``LMConfig``).

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
    raw, notes = migrate_moved_keys(raw)
    raw, more = migrate_moved_keys(apply_overrides(raw, list(overrides)))
    for note in notes + more:
        print(f"deprecated: {note}", file=sys.stderr)
    return config_from_dict(raw, tasks)


# ---------------------------------------------------------------------------
# Device-dependent checks
# ---------------------------------------------------------------------------


def resolve_mesh_shape(config: Config, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled in; checks they multiply to ``num_devices``.

    Raises:
      ConfigError: when the sizes do not fit the devices.
    """
    sizes = {axis: getattr(config.mesh, axis) for axis in ("data", "fsdp", "tensor")}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    described = ", ".join(f"{k}={v}" for k, v in sizes.items())
    if -1 in sizes.values():
        _fail(
            num_devices % fixed, f"mesh sizes ({described}) do not divide the {num_devices} devices"
        )
        return {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    _fail(
        fixed != num_devices,
        f"mesh sizes ({described}) use {fixed} devices but {num_devices} are available",
    )
    return sizes


def validate_for_devices(config: Config, num_devices: int) -> dict[str, int]:
    """Device-dependent checks; returns the resolved mesh shape.

    The global batch (per micro-batch) is split over the ``data`` and ``fsdp``
    axes; the task checks its own dims (``Config.check_mesh``: the LM's attention
    heads over ``tensor``).
    """
    shape = resolve_mesh_shape(config, num_devices)
    batch_shards = shape["data"] * shape["fsdp"]
    micro_batch = config.batch_size // config.grad_accum_steps
    _fail(
        micro_batch % batch_shards,
        f"micro-batch size batch_size/grad_accum_steps = {micro_batch} must be "
        f"divisible by mesh data*fsdp = {batch_shards}",
    )
    config.check_mesh(shape)
    return shape

"""What a training run builds before its loop, and the jitted steps it runs.

``train.py`` and the benchmarks share these, so a benchmark measures exactly
the step that training runs:

    run = build_run(config, jax.device_count())   # mesh, task, shapes, optimizer
    params, opt_state, step = init_or_restore(run, checkpointer)
    train_step, eval_step = make_train_step(run), make_eval_step(run)

Nothing is allocated by ``build_run``: params and optimizer state exist only
as shapes and shardings until ``init_or_restore`` creates them in their shards.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from training import mesh as mesh_lib
from training.checkpoint import Checkpointer, CheckpointError
from training.config import Config, ConfigError, config_to_dict, validate_for_devices
from training.optim import build_optimizer
from training.task import Task
from training.task import _identity as _identity_grads


@dataclasses.dataclass
class Run:
    """A run's static parts: mesh, task, model graph, abstract params and optimizer.

    Attributes:
        config: the run's config (with the task's optimizer defaults filled in).
        task: the task (model, loss, data).
        mesh, mesh_shape: the device mesh and its resolved axis sizes.
        graphdef: the model's graph (``nnx.merge(graphdef, params)`` rebuilds it).
        abstract_params: pure pytree of ``ShapeDtypeStruct`` (no Variables).
        param_specs, param_shardings: their PartitionSpecs / NamedShardings.
        dimension_numbers: GaLore batch axes (the model's stacked-layer axes).
        tx, lr_schedule: the optimizer and its learning-rate schedule.
        abstract_opt_state, opt_shardings: the optimizer state's shapes / shardings.
        scanned_model: the model's ``galore_jax.ScannedModel`` when layer-wise
            updates or per-layer clipping need it, else None.
    """

    config: Config
    task: Task
    mesh: jax.sharding.Mesh
    mesh_shape: dict
    graphdef: Any
    abstract_params: Any
    param_specs: Any
    param_shardings: Any
    dimension_numbers: Any
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    abstract_opt_state: Any
    opt_shardings: Any
    scanned_model: Optional[gj.ScannedModel] = None
    subspace_gradients: bool = False  # micro-batches accumulate in GaLore's subspace
    notes: list = dataclasses.field(default_factory=list)  # warnings to show at start-up

    @property
    def layerwise(self) -> bool:
        return self.config.optimizer.layerwise

    def init_opt_state(self, params: Any) -> Any:
        """The optimizer's initial state (per group for layer-wise updates)."""
        return _opt_state_init(self.config, self.tx, self.scanned_model)(params)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params))

    @property
    def explicit(self) -> bool:
        return self.config.mesh.kind == "explicit"


def dimension_numbers_from_layer_axes(layer_axes: Any) -> Any:
    """Per-param GaLore batch axes from the model's stacked-layer axis (int or None)."""
    return jax.tree.map(
        lambda axis: None if axis is None else gj.DimensionNumbers((axis,)),
        layer_axes,
        is_leaf=lambda x: x is None,
    )


def _check_something_is_projected(config: Config, abstract_opt_state: Any) -> None:
    """A GaLore run in which no param is projected is AdamW under another name."""
    if config.optimizer.name not in ("galore", "tensor_galore", "fira", "apollo", "apollo_mini"):
        return
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract_opt_state)[0]:
        names = gj.paths.path_string(keypath).split("/")
        if ("projectors" in names or "factors" in names) and getattr(leaf, "ndim", 0) > 0:
            return
    raise ConfigError(
        f"optimizer.name={config.optimizer.name} projects no param at optimizer.rank="
        f"{config.optimizer.rank!r}: every matrix / tensor would get plain Adam (no memory "
        "saved). Use a smaller optimizer.rank (or a float fraction), or optimizer.name=adamw"
    )


def build_run(config: Config, num_devices: int) -> Run:
    """config -> mesh -> task -> model shapes -> optimizer; nothing allocated.

    Raises:
        ConfigError: settings that do not fit the devices, the data or the model.
    """
    mesh_shape = validate_for_devices(config, num_devices)
    mesh = mesh_lib.make_mesh(mesh_shape, config.mesh.kind)
    task = config.build_task()  # ConfigError for a missing path / empty corpus
    config.optimizer = task.optimizer_defaults(config.optimizer)
    abstract_model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(config.seed)))
    graphdef, param_vars, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ConfigError("models with non-Param state are not supported by train.py")
    # The steps work on plain arrays; the Variables' metadata (logical axis
    # names) is only needed here, to place them.
    abstract_params = nnx.as_pure(param_vars)
    rules = mesh_lib.normalize_rules(config.mesh.rules or task.default_rules)
    param_specs = task.partition_specs(param_vars, rules)
    mesh_lib.check_divisible(abstract_params, param_specs, mesh)
    param_shardings = mesh_lib.named_shardings(mesh, param_specs)
    dims = dimension_numbers_from_layer_axes(task.layer_axes(param_vars))
    scanned = _scanned_model(config, task, abstract_model)
    with warnings.catch_warnings(record=True) as caught:  # printed by train.py, one line each
        warnings.simplefilter("always", gj.labels.RankFallbackWarning)
        tx, lr_schedule = build_optimizer(
            config.optimizer,
            config.steps,
            seed=config.seed,
            dimension_numbers=dims,
            params=abstract_params,
            scanned_model=scanned,
        )
        try:
            abstract_opt_state = jax.eval_shape(
                _opt_state_init(config, tx, scanned), abstract_params
            )
        except ValueError as e:  # e.g. a rank that does not fit a param's shape
            raise ConfigError(f"optimizer: {e}") from None
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    _check_something_is_projected(config, abstract_opt_state)
    subspace = _subspace_gradients(config, mesh_shape, task, tx, notes)
    if config.optimizer.layerwise:
        opt_shardings = gj.layerwise.layerwise_state_shardings(
            abstract_opt_state, scanned, abstract_params, param_shardings, gj.state_shardings
        )
    else:
        opt_shardings = gj.state_shardings(abstract_opt_state, abstract_params, param_shardings)
    return Run(
        config,
        task,
        mesh,
        mesh_shape,
        graphdef,
        abstract_params,
        param_specs,
        param_shardings,
        dims,
        tx,
        lr_schedule,
        abstract_opt_state,
        opt_shardings,
        scanned,
        subspace,
        notes,
    )


def _step_refusal(config: Config, mesh_shape, task: Task, tx) -> Optional[str]:
    """Why the standard step cannot sum in the subspace beyond the optimizer's own
    reasons (`OptimizerConfig.subspace_refusal`), or None."""
    opt = config.optimizer
    if mesh_shape["data"] > 1 and config.mesh.kind == "explicit":
        return "mesh.kind=explicit and mesh.data > 1 (use mesh.kind=auto)"
    if opt.grad_clip > 0 and opt.grad_clip_mode != "global":
        return f"optimizer.grad_clip_mode={opt.grad_clip_mode} (a clip stage of its own)"
    if task.postprocess_grads is not _identity_grads:
        return f"task {task.name!r} (it post-processes the summed gradient)"
    if not gj._low_rank.engines_of(tx):
        return "this optimizer"
    return None


def _subspace_gradients(config: Config, mesh_shape, task: Task, tx, notes: list) -> bool:
    """Whether micro-batches accumulate in GaLore's subspace (``optimizer.full_size_gradients``)."""
    opt, want = config.optimizer, config.optimizer.full_size_gradients
    if opt.layerwise:  # micro-batches only (the config checked the rest)
        if config.grad_accum_steps > 1 and opt.grad_clip > 0:
            notes.append(
                "layer-wise over micro-batches: the clip reads the gradient in GaLore's "
                "subspace (the full gradient is never summed)"
            )
        return config.grad_accum_steps > 1
    if want or (config.grad_accum_steps == 1 and mesh_shape["data"] == 1):
        return False
    refusal = opt.subspace_refusal() or _step_refusal(config, mesh_shape, task, tx)
    if refusal is not None:
        if want is False:
            raise ConfigError(
                f"optimizer.full_size_gradients=false: gradients cannot accumulate in the "
                f"subspace with {refusal}; remove the setting"
            )
        return False
    if opt.grad_clip > 0 and want is None:
        notes.append(
            "gradients are summed at full size: grad_clip > 0 needs the full gradient's "
            "norm (optimizer.full_size_gradients=false sums them in GaLore's subspace; "
            "the clip then bounds the norm there)"
        )
        return False
    if opt.grad_clip > 0:
        notes.append(
            "optimizer.full_size_gradients=false: grad_clip bounds the norm of the "
            "gradient in GaLore's subspace (the full gradient is never summed)"
        )
    return True


def _opt_state_init(config: Config, tx, scanned_model) -> Callable:
    """``params -> initial optimizer state`` (per group for layer-wise updates)."""
    if config.optimizer.layerwise:
        return functools.partial(gj.layerwise_init, tx, scanned_model)
    return tx.init


def _scanned_model(config: Config, task: Task, abstract_model: Any) -> Optional[gj.ScannedModel]:
    """The task's layer structure, where layer-wise updates or per-layer clipping need it."""
    opt = config.optimizer
    if not (opt.layerwise or (opt.grad_clip > 0 and opt.grad_clip_mode == "layer")):
        return None
    if task.scanned_model is None:
        raise ConfigError(
            f"task {task.name!r} has no scanned layers (optimizer.layerwise, "
            "optimizer.grad_clip_mode=layer)"
        )
    try:
        return task.scanned_model(abstract_model)
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None


def init_or_restore(run: Run, checkpointer: Optional[Checkpointer]) -> tuple[Any, Any, int]:
    """Params, optimizer state and step: from the latest checkpoint, else fresh.

    ``checkpointer`` may be None (benchmarks): always fresh.

    A restore also puts the data iterator back where the checkpoint left it.
    Fresh params are created directly in their shards (never whole on one device).

    Raises:
        ConfigError: checkpoints exist but ``checkpoint.resume`` is false.
        CheckpointError: the checkpoint is damaged or does not fit this run.
    """
    config = run.config
    step = checkpointer.latest_step() if checkpointer is not None else None
    if step is None:

        def init_params():
            return nnx.as_pure(nnx.state(run.task.make_model(nnx.Rngs(config.seed)), nnx.Param))

        params = jax.jit(init_params, out_shardings=run.param_shardings)()
        opt_state = jax.jit(run.init_opt_state, out_shardings=run.opt_shardings)(params)
        return params, opt_state, 0
    if not config.checkpoint.resume:
        raise ConfigError(
            f"{config.output_dir} already has checkpoints (latest step {step});"
            " use a new output_dir or checkpoint.resume=true"
        )
    checkpointer.check_compatible(step, config_to_dict(config))
    params, opt_state, data_state = checkpointer.restore(
        step,
        abstract_params=run.abstract_params,
        param_shardings=run.param_shardings,
        abstract_opt_state=run.abstract_opt_state,
        opt_state_shardings=run.opt_shardings,
    )
    try:
        run.task.train_iterator.set_state(data_state)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint step {step}: cannot continue the data stream ({e})"
        ) from None
    return params, opt_state, step


def micro_batches(batch: Any, accum: int) -> Any:
    """``[batch, ...]`` host arrays -> ``[accum, batch / accum, ...]``."""
    return jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)


def global_batch(batch: Any, sharding: jax.sharding.Sharding, batch_axis: int) -> Any:
    """This process's rows of a batch -> global arrays with ``sharding``."""

    def to_global(x):
        shape = list(x.shape)
        shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(to_global, batch)


def make_loss_and_grads(run: Run) -> Callable:
    """``(params, batches[accum, ...]) -> (mean loss, mean grads)`` over the micro-batches."""
    accum = run.config.grad_accum_steps

    def loss_of(params, batch):
        return run.task.loss_fn(nnx.merge(run.graphdef, params), batch)

    def loss_and_grads(params, batches):
        if accum == 1:
            return jax.value_and_grad(loss_of)(params, jax.tree.map(lambda x: x[0], batches))

        def add_micro_batch(total, batch):
            loss, grads = jax.value_and_grad(loss_of)(params, batch)
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(add_micro_batch, zeros, batches)
        return jax.tree.map(lambda x: x / accum, (loss, grads))

    if run.explicit:
        # The model annotates no activation shardings: let the partitioner place
        # them, and hand back loss and grads in explicit types.
        return jax.sharding.auto_axes(loss_and_grads, out_sharding=(P(), run.param_specs))
    return loss_and_grads


def make_layerwise_step(run: Run) -> Callable:
    """``(params, opt_state, batches[accum, ...]) -> (params, opt_state, metrics)``,
    un-jitted: the optimizer applied one layer at a time (``galore_jax.layerwise``);
    inside the backward pass of one micro-batch, or after micro-batches summed in
    GaLore's subspace."""
    opt = run.config.optimizer
    step = gj.layerwise_step(
        run.tx,
        run.scanned_model,
        max_norm=opt.grad_clip or None,
        clip="previous_global" if opt.grad_clip_mode == "previous_global" else "layer",
        micro_batches=run.subspace_gradients,
        refresh_parts=opt.refresh_parts,
    )

    def layerwise(params, opt_state, batches):
        if run.subspace_gradients:
            return step(params, opt_state, batches)
        return step(params, opt_state, jax.tree.map(lambda x: x[0], batches))

    if run.explicit:  # as make_loss_and_grads: the partitioner places activations
        specs = jax.tree.map(lambda s: s.spec, (run.param_shardings, run.opt_shardings))
        metrics = {"loss": P(), "grad_norm": P()}
        return jax.sharding.auto_axes(layerwise, out_sharding=(*specs, metrics))
    return layerwise


def _gradient_metrics(grads) -> dict:
    """The global norm over the finite leaves (optax.tree.norm's value when all are) and
    how many leaves were not finite (our optimizers zero those for the step)."""
    norm, nonfinite = gj.clipping.norm_of_finite_leaves(grads)
    return {"grad_norm": norm, "nonfinite_leaves": nonfinite}


def _make_subspace_step(run: Run) -> Callable:
    """The un-jitted step with micro-batches (and data-parallel replicas) summed in
    GaLore's subspace (``galore_jax.accumulate_in_subspace``)."""

    def loss_of(params, batch):
        return run.task.loss_fn(nnx.merge(run.graphdef, params), batch)

    # Data-parallel replicas average the low-rank sums (jax.shard_map over `data`;
    # FSDP and tensor axes stay with the partitioner).
    data_parallel = run.mesh_shape["data"] > 1
    accumulate = gj.accumulate_in_subspace(
        loss_of,
        run.tx,
        axis_name="data" if data_parallel else None,
        refresh_parts=run.config.optimizer.refresh_parts,
    )
    if data_parallel:
        accumulate = jax.shard_map(
            accumulate,
            mesh=run.mesh,
            in_specs=(P(), P(None, "data"), P()),
            out_specs=P(),
            axis_names={"data"},
        )

    def subspace(params, opt_state, batches):
        loss, grads, sub = accumulate(params, batches, opt_state)
        updates, opt_state = run.tx.update(grads, opt_state, params, subspace=sub)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, **_gradient_metrics(grads)}

    if run.explicit:  # as make_loss_and_grads: the partitioner places activations
        specs = jax.tree.map(lambda s: s.spec, (run.param_shardings, run.opt_shardings))
        metrics = {"loss": P(), "grad_norm": P(), "nonfinite_leaves": P()}
        return jax.sharding.auto_axes(subspace, out_sharding=(*specs, metrics))
    return subspace


def _make_standard_step(run: Run) -> Callable:
    """The un-jitted step: the mean gradient, then the optimizer on the whole tree."""
    if run.subspace_gradients:
        return _make_subspace_step(run)
    loss_and_grads = make_loss_and_grads(run)

    def standard(params, opt_state, batches):
        loss, grads = loss_and_grads(params, batches)
        grads = run.task.postprocess_grads(grads)  # e.g. conjugate complex grads (FNO)
        updates, opt_state = run.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, **_gradient_metrics(grads)}

    return standard


def make_train_step(run: Run, *, donate: bool = True) -> Callable:
    """The jitted step ``(params, opt_state, batches) -> (params, opt_state, metrics)``.

    ``batches`` are global arrays ``[accum, batch / accum, ...]`` (see
    ``micro_batches`` / ``global_batch``); metrics are ``loss`` and ``grad_norm`` (and, for
    the standard step, ``nonfinite_leaves``: leaves whose gradient was zeroed).
    With ``optimizer.layerwise`` the step is ``make_layerwise_step``'s.
    """
    train_step = make_layerwise_step(run) if run.layerwise else _make_standard_step(run)
    return jax.jit(
        train_step,
        in_shardings=(run.param_shardings, run.opt_shardings, train_batch_sharding(run)),
        out_shardings=(run.param_shardings, run.opt_shardings, mesh_lib.replicated(run.mesh)),
        donate_argnums=(0, 1) if donate else (),
    )


def make_eval_step(run: Run) -> Callable:
    """The jitted ``(params, batch) -> validation loss`` of one global batch."""

    def eval_loss(params, batch):
        return run.task.eval_loss_fn(nnx.merge(run.graphdef, params), batch)

    if run.explicit:
        eval_loss = jax.sharding.auto_axes(eval_loss, out_sharding=P())
    return jax.jit(eval_loss, in_shardings=(run.param_shardings, eval_batch_sharding(run)))


def train_batch_sharding(run: Run) -> jax.sharding.NamedSharding:
    return mesh_lib.batch_sharding(run.mesh, leading_dims=1)  # [accum, batch, ...]


def eval_batch_sharding(run: Run) -> jax.sharding.NamedSharding:
    return mesh_lib.batch_sharding(run.mesh)


def next_train_batches(run: Run) -> Any:
    """The next global training batch, as ``make_train_step`` takes it."""
    batch = micro_batches(next(run.task.train_iterator), run.config.grad_accum_steps)
    return global_batch(batch, train_batch_sharding(run), 1)


def evaluate(run: Run, eval_step: Callable, params: Any) -> dict:
    """Validation metrics over the task's fixed validation batches (and its extra sets)."""
    sharding = eval_batch_sharding(run)

    def mean_loss(batches):
        return float(
            np.mean([float(eval_step(params, global_batch(b, sharding, 0))) for b in batches])
        )

    metrics = dict(run.task.summarize_eval(mean_loss(run.task.eval_batches())))
    for name, batches in run.task.extra_eval_sets().items():
        metrics[name] = mean_loss(batches)
    return metrics


def describe_run(run: Run, opt_state_bytes: Optional[int] = None) -> str:
    """The start-up lines: data, mesh, params, optimizer and each leaf's treatment.

    The optimizer's state size is given beside AdamW's for the same params (what
    ``optax.adamw`` keeps: two moments in the params' dtypes and a counter).
    """
    state_bytes = opt_state_bytes or gj.memory.optimizer_state_bytes(run.abstract_opt_state)
    adamw_bytes = gj.memory.adamw_state_bytes(run.abstract_params)
    # "(... MiB state)" stays as it was: benchmarks/convergence.py reads it.
    lines = [
        run.task.description,
        f"{mesh_lib.describe(run.mesh)} | {run.num_params / 1e6:.2f}M params | optimizer "
        f"{run.config.optimizer.name} ({state_bytes / 2**20:.1f} MiB state) = "
        f"{state_bytes / adamw_bytes:.2f}x AdamW's {adamw_bytes / 2**20:.1f} MiB",
    ]
    if run.layerwise:
        lines.append(
            f"layer-wise updates: the optimizer runs inside the backward pass, one of the "
            f"{run.config.model.num_layers} layers at a time (each leaf below: per layer)"
        )
    if run.subspace_gradients:
        replicas = (
            ""
            if run.layerwise
            else f" and {run.mesh_shape['data']} data-parallel replica(s) averaged"
        )
        lines.append(
            f"gradients in GaLore's subspace: {run.config.grad_accum_steps} micro-batch(es) "
            f"summed{replicas} as low-rank projections (a refresh step makes extra passes, "
            f"in {run.config.optimizer.refresh_parts} part(s))"
        )
    if run.config.optimizer.name != "adamw":
        params = run.abstract_params
        if run.layerwise:  # what the optimizer sees: one layer of the stack
            params = gj.scanned.one_layer_view(run.scanned_model, params)
        lines.append(str(gj.describe(run.tx, params)))
    else:  # the describe table's last line (benchmarks/convergence.py reads it)
        lines.append(f"total optimizer state: {state_bytes:,} bytes")
    return "\n".join(lines)

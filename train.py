"""Train a model with AdamW or GaLore, sharded over a device mesh.

    python train.py --config configs/llama_tiny.yaml [key=value ...]

Overrides use dotted keys and YAML values, e.g. ``optimizer.name=galore
optimizer.rank=16 steps=200 mesh.fsdp=2``. The script reads top to bottom:
config -> mesh -> model -> optimizer -> data -> checkpoint/resume -> loop.

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per log line),
``config.yaml`` (the resolved config), ``checkpoints/<step>/`` (orbax) and,
if enabled and installed, ``tensorboard/``. Running again with the same
output_dir resumes from the latest checkpoint. SIGTERM or Ctrl-C saves a
checkpoint and exits cleanly. Configuration problems print one ``error: ...``
line and exit with status 2 before anything in output_dir is touched.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import PartitionSpec as P

from training import mesh as mesh_lib
from training.checkpoint import CheckpointError, Checkpointer
from training.config import ConfigError, config_to_dict, load_config, validate_for_devices
from training.metrics import MetricsLogger, Throughput
from training.optim import build_optimizer, opt_state_shardings, optimizer_state_bytes
from training.task import build_task


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train a model (LLaMA LM, FNO) with AdamW, GaLore or Tensor-GaLore.")
    parser.add_argument("--config", help="YAML config file (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optimizer.lr=3e-4 steps=100")
    return parser.parse_args(argv)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits when set.

    A second Ctrl-C while the flag is already set aborts immediately.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __bool__(self):
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(load_config(args.config, args.overrides))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(config) -> int:
    is_main = lambda: jax.process_index() == 0  # noqa: E731
    say = lambda *a: print(*a, flush=True) if is_main() else None  # noqa: E731

    # ---- Multi-host start-up (before anything touches the devices) --------
    dist = config.distributed
    mesh_lib.maybe_initialize_distributed(
        dist.coordinator_address, dist.num_processes, dist.process_id)

    # ---- Mesh ---------------------------------------------------------------
    mesh_shape = validate_for_devices(config, jax.device_count())
    mesh = mesh_lib.make_mesh(mesh_shape, config.mesh.kind)
    explicit = config.mesh.kind == "explicit"

    # ---- Data and model (task-specific parts) ------------------------------
    task = build_task(config)  # ConfigError for a missing path / empty corpus
    config.optimizer = task.optimizer_defaults(config.optimizer)
    rules = mesh_lib.normalize_rules(config.mesh.rules or task.default_rules)
    abstract_model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(config.seed)))
    graphdef, param_vars, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(abstract_rest):
        raise ConfigError("models with non-Param state are not supported by train.py")
    # The train step works on plain arrays; the Variables' metadata (logical
    # axis names) is only needed here, to place them.
    abstract_params = nnx.as_pure(param_vars)
    param_specs = task.partition_specs(param_vars, rules)
    mesh_lib.check_divisible(abstract_params, param_specs, mesh)
    param_shardings = mesh_lib.named_shardings(mesh, param_specs)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))

    # ---- Optimizer ----------------------------------------------------------
    tx, lr_schedule = build_optimizer(
        config.optimizer, config.steps, seed=config.seed,
        dimension_numbers=_dimension_numbers(task.layer_axes(param_vars)),
        params=abstract_params)
    try:
        abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    except ValueError as e:  # e.g. a rank that does not fit a param's shape
        raise ConfigError(f"optimizer: {e}") from None
    opt_shardings = opt_state_shardings(
        tx, abstract_opt_state, abstract_params, param_shardings, mesh)

    # ---- Checkpoints: resume if output_dir has any --------------------------
    # Everything above only read files; from here on output_dir is written.
    checkpointer = Checkpointer(
        os.path.join(config.output_dir, "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save)
    config_dict = config_to_dict(config)
    start_step = checkpointer.latest_step()
    if start_step is not None and not config.checkpoint.resume:
        raise ConfigError(
            f"{config.output_dir} already has checkpoints (latest step {start_step});"
            " use a new output_dir or checkpoint.resume=true")

    with mesh_lib.use_mesh(mesh):
        if start_step is not None:
            checkpointer.check_compatible(start_step, config_dict)
            params, opt_state, data_state = checkpointer.restore(
                start_step,
                abstract_params=abstract_params, param_shardings=param_shardings,
                abstract_opt_state=abstract_opt_state, opt_state_shardings=opt_shardings)
            try:
                task.train_iterator.set_state(data_state)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    f"checkpoint step {start_step}: cannot continue the data stream ({e})")
        else:
            start_step = 0

            # Params are created directly in their shards (never whole on one device).
            def init_params():
                model = task.make_model(nnx.Rngs(config.seed))
                return nnx.as_pure(nnx.state(model, nnx.Param))

            params = jax.jit(init_params, out_shardings=param_shardings)()
            opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

        if is_main():
            os.makedirs(config.output_dir, exist_ok=True)
            with open(os.path.join(config.output_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config_dict, f, sort_keys=False)
        say(f"{task.description}")
        say(f"{mesh_lib.describe(mesh)} | {num_params / 1e6:.2f}M params | "
            f"optimizer {config.optimizer.name} "
            f"({optimizer_state_bytes(abstract_opt_state) / 2**20:.1f} MiB state)")
        if start_step:
            say(f"resumed from step {start_step} ({checkpointer.directory})")
        if start_step >= min(config.steps, config.stop_after or config.steps):
            say(f"already at step {start_step} (steps={config.steps}, "
                f"stop_after={config.stop_after}); nothing to do")
            checkpointer.close()
            return 0

        # ---- Train and eval steps ----------------------------------------------
        accum = config.grad_accum_steps
        batch_sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)  # [accum, batch, ...]
        eval_batch_sharding = mesh_lib.batch_sharding(mesh)

        def loss_of(params, batch):
            return task.loss_fn(nnx.merge(graphdef, params), batch)

        def loss_and_grads(params, batches):
            """Mean loss and gradient over the ``accum`` micro-batches."""
            if accum == 1:
                return jax.value_and_grad(loss_of)(
                    params, jax.tree.map(lambda x: x[0], batches))

            def add_micro_batch(total, batch):
                loss, grads = jax.value_and_grad(loss_of)(params, batch)
                return jax.tree.map(jnp.add, total, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(add_micro_batch, zeros, batches)
            return jax.tree.map(lambda x: x / accum, (loss, grads))

        if explicit:
            # The model annotates no activation shardings: let the partitioner
            # place them, and hand back loss and grads in explicit types.
            loss_and_grads = jax.sharding.auto_axes(
                loss_and_grads, out_sharding=(P(), param_specs))

        def train_step(params, opt_state, batches):
            loss, grads = loss_and_grads(params, batches)
            grads = task.postprocess_grads(grads)  # e.g. conjugate complex grads (FNO)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

        train_step = jax.jit(
            train_step,
            in_shardings=(param_shardings, opt_shardings, batch_sharding),
            out_shardings=(param_shardings, opt_shardings, mesh_lib.replicated(mesh)),
            donate_argnums=(0, 1))

        def eval_loss(params, batch):
            return task.eval_loss_fn(nnx.merge(graphdef, params), batch)

        if explicit:
            eval_loss = jax.sharding.auto_axes(eval_loss, out_sharding=P())
        eval_step = jax.jit(eval_loss, in_shardings=(param_shardings, eval_batch_sharding))

        def evaluate(params) -> dict:
            losses = [eval_step(params, _global_array(b, eval_batch_sharding, 0))
                      for b in task.eval_batches()]
            return task.summarize_eval(float(np.mean([float(x) for x in losses])))

        def save(step):
            checkpointer.save(step, params=params, opt_state=opt_state,
                              data_state=task.train_iterator.get_state(),
                              config=config_dict, mesh_shape=mesh_shape)

        # ---- Loop ---------------------------------------------------------------
        metrics_log = MetricsLogger(config.output_dir, tensorboard=config.tensorboard,
                                    resume_step=start_step if start_step else None)
        stop = StopFlag()
        stop.install()
        progress = _progress_bar(config, start_step, enabled=is_main())
        throughput = Throughput()
        pending_losses = []
        step = start_step
        failed = diverged = True  # until the loop finishes normally
        try:
            last_step = min(config.steps, config.stop_after or config.steps)
            while step < last_step and not stop:
                batch = next(task.train_iterator)
                batches = jax.tree.map(
                    lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
                params, opt_state, step_metrics = train_step(
                    params, opt_state, _global_array(batches, batch_sharding, 1))
                step += 1
                pending_losses.append(step_metrics["loss"])
                throughput.add(task.units_per_batch)
                progress.update(1)

                # Also log the last step of this invocation (end, stop_after, signal).
                if step % config.log_every == 0 or step == last_step or stop:
                    loss = float(np.mean(jax.device_get(pending_losses)))
                    pending_losses = []
                    rate = throughput.measure()
                    record = {"loss": loss, "lr": float(lr_schedule(step - 1)),
                              "grad_norm": float(step_metrics["grad_norm"]),
                              f"{task.units_name}_per_s": rate}
                    metrics_log.log(step, record)
                    progress.set_postfix(loss=f"{loss:.4f}",
                                         **{f"{task.units_name}/s": f"{rate:,.0f}"})
                    _write(progress, f"step {step:6d} | loss {loss:.4f} | "
                           f"lr {record['lr']:.2e} | {rate:,.0f} {task.units_name}/s")
                    if not np.isfinite(loss):
                        _write(progress, f"loss is not finite at step {step}; stopping")
                        break

                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    eval_metrics = evaluate(params)
                    metrics_log.log(step, eval_metrics)
                    _write(progress, f"step {step:6d} | " + " | ".join(
                        f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                    throughput.measure()  # don't count eval time as training time

                if config.checkpoint.every and step % config.checkpoint.every == 0:
                    save(step)
            else:
                diverged = False
            failed = False
        finally:
            stop.uninstall()
            progress.close()
            # Leave a checkpoint of the last completed step (not of a crash or
            # a divergence), then wait until every save is finalized.
            if not failed and not diverged and step > start_step:
                save(step)
            checkpointer.close()
            metrics_log.close()

    if diverged:
        print(f"error: training diverged at step {step} (non-finite loss)",
              file=sys.stderr)
        return 1
    if stop:
        say(f"{stop.signal_name}: stopped at step {step}; checkpoint saved, "
            "run again to resume")
    else:
        say(f"done: step {step}, checkpoint in {checkpointer.directory}")
    return 0


def _dimension_numbers(layer_axes):
    """Per-param GaLore batch axes from the model's stacked-layer axes."""
    try:
        import galore_jax as gj
        make = gj.DimensionNumbers
    except (ImportError, AttributeError):
        return None
    return jax.tree.map(
        lambda axis: None if axis is None else make(batch_axes=(axis,)),
        layer_axes, is_leaf=lambda x: x is None)


def _global_array(batch, sharding, batch_axis):
    """This process's rows of a batch -> global arrays with ``sharding``."""
    def to_global(x):
        shape = list(x.shape)
        shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))
    return jax.tree.map(to_global, batch)


def _progress_bar(config, start_step, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not (enabled and config.progress_bar):
        return _NoProgress()
    return tqdm(total=config.steps, initial=start_step, dynamic_ncols=True,
                leave=False, file=sys.stderr)


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _write(progress, line):
    if jax.process_index() != 0:
        return
    if isinstance(progress, _NoProgress):
        print(line, flush=True)
    else:
        progress.write(line, file=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())

"""Train a model with AdamW or GaLore, sharded over a device mesh.

    python train.py --config configs/llama_tiny.yaml [key=value ...]

Overrides use dotted keys and YAML values, e.g. ``optimizer.name=galore
optimizer.rank=16 steps=200 mesh.fsdp=2``. The script reads top to bottom:
config -> mesh, data, model, optimizer (``training.steps.build_run``) ->
checkpoint/resume -> loop; the loop ends on a stated reason (done, stop_after,
a signal, divergence).

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per log line),
``config.yaml`` (the resolved config), ``checkpoints/<step>/`` (orbax) and,
if enabled and installed, ``tensorboard/``. Running again with the same
output_dir resumes from the latest checkpoint. SIGTERM or Ctrl-C saves a
checkpoint and exits cleanly (every process after the same step); a second
one aborts at once; a step that makes no progress for ``step_timeout_s``
ends the run with an error. Configuration problems print one ``error: ...``
line and exit with status 2 before anything in output_dir is touched.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import yaml

from training import mesh as mesh_lib
from training import steps
from training.checkpoint import Checkpointer, CheckpointError
from training.config import ConfigError, config_to_dict, load_config
from training.metrics import MetricsLogger, Throughput
from training.preemption import Preemption


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train a model (LLaMA LM, FNO) with AdamW, GaLore or Tensor-GaLore."
    )
    parser.add_argument("--config", help="YAML config file (defaults if omitted)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. optimizer.lr=3e-4 steps=100",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(load_config(args.config, args.overrides))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(config) -> int:
    dist = config.distributed  # multi-host start-up, before anything touches the devices
    mesh_lib.maybe_initialize_distributed(
        dist.coordinator_address, dist.num_processes, dist.process_id
    )
    run = steps.build_run(config, jax.device_count())  # mesh, data, model, optimizer
    # Everything above only read files; from here on output_dir is written.
    checkpointer = Checkpointer(
        os.path.join(config.output_dir, "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    with mesh_lib.use_mesh(run.mesh):
        params, opt_state, start = steps.init_or_restore(run, checkpointer)
        write_config(config)
        say(steps.describe_run(run))
        if start:
            say(f"resumed from step {start} ({checkpointer.directory})")
        last = min(config.steps, config.stop_after or config.steps)
        if start >= last:
            say(
                f"already at step {start} (steps={config.steps}, "
                f"stop_after={config.stop_after}); nothing to do"
            )
            checkpointer.close()
            return 0

        train_step, eval_step = steps.make_train_step(run), steps.make_eval_step(run)
        log = Log(run, start, last)
        step, reason = start, None
        # Signals: every process stops after the same step; a second one aborts.
        with Preemption(run.mesh, config.step_timeout_s) as preemption:
            try:
                while reason is None:
                    params, opt_state, metrics = train_step(
                        params, opt_state, steps.next_train_batches(run)
                    )
                    step += 1
                    stopping = preemption.agreed_stop(step)
                    if not log.train(step, metrics, force=stopping):
                        reason = "diverged"
                        break
                    if (config.eval_every and step % config.eval_every == 0) or (
                        step == config.steps
                    ):
                        log.eval(step, steps.evaluate(run, eval_step, params))
                    if config.checkpoint.every and step % config.checkpoint.every == 0:
                        save(checkpointer, run, step, params, opt_state)
                    preemption.progress(step)
                    reason = (
                        "done"
                        if step == config.steps
                        else "stop_after"
                        if step == last
                        else preemption.signal_name
                        if stopping
                        else None
                    )
                # A checkpoint of the last completed step (never of a divergence).
                if reason != "diverged":
                    save(checkpointer, run, step, params, opt_state)
            finally:  # also on an exception: wait until every started save is finalized
                log.close()
                checkpointer.close()

    if reason == "diverged":
        print(f"error: training diverged at step {step} (non-finite loss)", file=sys.stderr)
        return 1
    if reason == "stop_after":
        say(f"stopped after step {step} (stop_after); run again to continue")
    elif reason != "done":  # a signal, here or on another process
        say(f"{reason}: stopped at step {step}; checkpoint saved, run again to resume")
    else:
        say(f"done: step {step}, checkpoint in {checkpointer.directory}")
    return 0


def say(*args):
    if jax.process_index() == 0:
        print(*args, flush=True)


def write_config(config):
    """The resolved config (task defaults filled in) as ``<output_dir>/config.yaml``."""
    if jax.process_index() == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_to_dict(config), f, sort_keys=False)


def save(checkpointer, run, step, params, opt_state):
    checkpointer.save(
        step,
        params=params,
        opt_state=opt_state,
        data_state=run.task.train_iterator.get_state(),
        config=config_to_dict(run.config),
        mesh_shape=run.mesh_shape,
    )


class Log:
    """Progress bar, log lines and ``metrics.jsonl`` for one invocation of the loop."""

    def __init__(self, run, start, last):
        self.run, self.last = run, last
        self.metrics = MetricsLogger(
            run.config.output_dir, tensorboard=run.config.tensorboard, resume_step=start or None
        )
        self.progress = _progress_bar(run.config, start, enabled=jax.process_index() == 0)
        self.throughput = Throughput()
        self.pending_losses = []

    def train(self, step, metrics, *, force=False) -> bool:
        """Records one step; logs every ``log_every`` steps, at the last one and
        when ``force``d. Returns False when the logged loss is not finite."""
        task = self.run.task
        self.pending_losses.append(metrics["loss"])
        self.throughput.add(task.units_per_batch)
        self.progress.update(1)
        if not (step % self.run.config.log_every == 0 or step == self.last or force):
            return True
        loss = float(np.mean(jax.device_get(self.pending_losses)))
        self.pending_losses = []
        rate = self.throughput.measure()
        record = {
            "loss": loss,
            "lr": float(self.run.lr_schedule(step - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            f"{task.units_name}_per_s": rate,
        }
        self.metrics.log(step, record)
        self.progress.set_postfix(loss=f"{loss:.4f}", **{f"{task.units_name}/s": f"{rate:,.0f}"})
        self.write(
            f"step {step:6d} | loss {loss:.4f} | lr {record['lr']:.2e} | "
            f"{rate:,.0f} {task.units_name}/s"
        )
        if not np.isfinite(loss):
            self.write(f"loss is not finite at step {step}; stopping")
            return False
        return True

    def eval(self, step, metrics):
        self.metrics.log(step, metrics)
        self.write(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.throughput.measure()  # don't count eval time as training time

    def write(self, line):
        if jax.process_index() != 0:
            return
        if isinstance(self.progress, _NoProgress):
            print(line, flush=True)
        else:
            self.progress.write(line, file=sys.stdout)

    def close(self):
        self.progress.close()
        self.metrics.close()


def _progress_bar(config, start_step, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not (enabled and config.progress_bar):
        return _NoProgress()
    return tqdm(
        total=config.steps, initial=start_step, dynamic_ncols=True, leave=False, file=sys.stderr
    )


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


if __name__ == "__main__":
    sys.exit(main())

"""Train a model with AdamW or GaLore, sharded over a device mesh.

    python train.py --config configs/llama_tiny.yaml [key=value ...]

Overrides use dotted keys and YAML values, e.g. ``optimizer.name=galore
optimizer.rank=16 steps=200 mesh.fsdp=2``. The script reads top to bottom:
config (``tasks.registry``: the ``task``'s schema) -> mesh, task (data, model),
optimizer (``training.steps.build_run``) -> checkpoint/resume -> loop (log lines:
``training.log``); the loop ends on a stated reason (done, stop_after, a signal,
divergence).

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per log line),
``config.yaml`` (the resolved config of the latest invocation that trained),
``config_history.yaml`` (one YAML document per such invocation, appended:
``start_step`` and the resolved ``config``; a run begun before this file
existed gets its old ``config.yaml`` first, with ``start_step: null``),
``checkpoints/<step>/`` (orbax) and, if enabled and installed,
``tensorboard/``. SIGTERM or Ctrl-C saves a checkpoint and exits cleanly
(every process after the same step); a second one aborts at once; a step that
makes no progress for ``step_timeout_s`` ends the run with an error.
Configuration problems print one ``error: ...`` line and exit with status 2
before anything in output_dir is touched.

Resuming: running again with the same output_dir resumes from the latest
checkpoint. Settings that change the state's layout (model shape, optimizer
name / rank / projection / bits / master copy / layer-wise, ...: see
``training.checkpoint.STRUCTURAL_CONFIG_KEYS``) are an error. Any other
setting that differs from the checkpoint's config is printed as one line,
``config changed on resume: key: old -> new, ...`` (dotted keys), except those
that do not change what the run computes: output_dir, stop_after, log_every,
eval_every, progress_bar, step_timeout_s, tensorboard, checkpoint.* and
distributed.* (``training.checkpoint.UNTRACKED_CONFIG_KEYS``). The lr schedule
is a function of the optimizer's step count and of ``steps``, ``optimizer.lr``,
``warmup_fraction`` and ``final_lr_fraction``: it is rebuilt from the new
values (no restart from step 0; warm-up and cosine are stretched or shrunk to
the new ``steps``), and when one of these changed the line also says which lr
the next step gets instead of the old schedule's.

A damaged newest checkpoint (files that cannot be read) is not fatal while an
earlier one (``checkpoint.max_to_keep``) is intact: one ``warning:`` line names
it, the run resumes from the newest intact step, and the damaged directory is
moved, never deleted, to ``checkpoints_damaged/<step>`` (so the run can save
that step again). If none is intact: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import yaml

from tasks.registry import load_config
from training import mesh as mesh_lib
from training import optim, steps
from training.checkpoint import (
    NOT_SET,
    Checkpointer,
    CheckpointError,
    DamagedCheckpointError,
    config_changes,
)
from training.config import ConfigError, config_to_dict
from training.log import Log, say
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
    try:  # closed on every path (an error too): no orbax threads left at exit
        return _train(config, run, checkpointer)
    finally:
        checkpointer.close()


def _train(config, run, checkpointer) -> int:
    with mesh_lib.use_mesh(run.mesh):
        params, opt_state, start = restore_or_init(run, checkpointer)
        say(steps.describe_run(run))
        for note in run.notes:  # e.g. matrices that get plain Adam only because of the rank
            say(f"warning: {note}", file=sys.stderr)
        if start:
            say(f"resumed from step {start} ({checkpointer.directory})")
            changed = describe_config_changes(
                checkpointer.read_config_and_meta(start)[0], run, start
            )
            if changed:
                say(changed)
        last = min(config.steps, config.stop_after or config.steps)
        if start >= last:
            say(
                f"already at step {start} (steps={config.steps}, "
                f"stop_after={config.stop_after}); nothing to do"
            )
            return 0
        write_config(config, start)

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
                checkpointer.close()  # before "done": the last save is finalized

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


def restore_or_init(run, checkpointer):
    """``steps.init_or_restore``, past damaged checkpoints to the newest intact one.

    A checkpoint that cannot be read is skipped (one ``warning:`` line) and moved
    to ``<output_dir>/checkpoints_damaged/``; if every one is damaged, the newest
    one's error is raised. Checkpoints that do not fit the config stay errors.
    """
    damaged = []
    while True:
        try:
            params, opt_state, start = steps.init_or_restore(run, checkpointer)
            break
        except DamagedCheckpointError as e:
            damaged.append(e)
            checkpointer.skip(e.step)
            if checkpointer.latest_step() is None:  # nothing intact: never start afresh
                if len(damaged) == 1:
                    raise
                names = ", ".join(str(d.step) for d in damaged)
                raise CheckpointError(
                    f"no checkpoint in {checkpointer.directory} can be restored: step {names}"
                    f" are damaged ({damaged[0].reason}); delete them or use a new output_dir"
                ) from None
    if damaged:
        aside = os.path.join(run.config.output_dir, "checkpoints_damaged")
        moved = [checkpointer.set_aside(d.step, aside) for d in damaged]
        names = ", ".join(str(d.step) for d in damaged)
        which = f"steps {names} are" if len(damaged) > 1 else f"step {names} is"
        say(
            f"warning: checkpoint {which} damaged in {checkpointer.directory}"
            f" ({damaged[0].reason}); resuming from step {start}, the newest intact one"
            f" (the damaged files are kept in {', '.join(moved)})",
            file=sys.stderr,
        )
    return params, opt_state, start


SCHEDULE_KEYS = (
    "steps",
    "optimizer.lr",
    "optimizer.warmup_fraction",
    "optimizer.final_lr_fraction",
)


# What a changed value does not do, where the line alone would mislead.
CHANGE_NOTES = {
    # the seed draws the initial params, the optimizer's PRNG key and the data order:
    # all three come from the checkpoint
    "seed": " (no effect on a resumed run)",
}


def describe_config_changes(saved, run, start):
    """``config changed on resume: key: old -> new, ...`` against the checkpoint's
    config ``saved`` (None when nothing that matters changed); changes to the lr
    schedule also say which lr the next step gets instead of the old schedule's."""
    changes = config_changes(saved, config_to_dict(run.config))
    if not changes:
        return None
    line = "config changed on resume: " + ", ".join(
        f"{key}: {_value(old)} -> {_value(new)}{CHANGE_NOTES.get(key, '')}"
        for key, old, new in changes
    )
    changed = {key: old for key, old, _ in changes}
    if any(key in changed for key in SCHEDULE_KEYS):
        config, opt = run.config, run.config.optimizer
        try:
            old_opt = dataclasses.replace(
                opt,
                **{
                    key.split(".")[1]: changed[key]
                    for key in SCHEDULE_KEYS[1:]
                    if key in changed and changed[key] is not NOT_SET
                },
            )
            old_steps = changed.get("steps", config.steps)
            old_lr = float(optim.lr_schedule(old_opt, int(old_steps))(start))
        except (TypeError, ValueError, ConfigError):  # a saved value from another version
            old_lr = None
        new_lr = float(run.lr_schedule(start))
        rebuilt = f" for steps={config.steps}" if "steps" in changed else ""
        line += f"; the lr schedule is rebuilt{rebuilt}: step {start + 1} trains at lr {new_lr:.3g}"
        if old_lr is not None:
            line += f" instead of {old_lr:.3g}"
        warmup = int(opt.warmup_fraction * config.steps)
        if warmup > start:
            line += f" (in warm-up until step {warmup})"
        elif "steps" in changed:
            line += f" (warm-up ended at step {warmup}; the cosine now ends at step {config.steps})"
    return line


def _value(value):
    """A config value as the line shows it (YAML-like: null, true, [1, 2])."""
    if value is NOT_SET:
        return value
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


def write_config(config, start_step):
    """The resolved config (task defaults filled in) as ``<output_dir>/config.yaml``,
    also appended to ``config_history.yaml`` with the step this invocation starts at."""
    if jax.process_index() != 0:
        return
    os.makedirs(config.output_dir, exist_ok=True)
    latest = os.path.join(config.output_dir, "config.yaml")
    history = os.path.join(config.output_dir, "config_history.yaml")
    resolved = config_to_dict(config)
    documents = [{"start_step": start_step, "config": resolved}]
    if not os.path.exists(history) and os.path.exists(latest):  # a run begun before history
        with open(latest) as f:
            documents.insert(0, {"start_step": None, "config": yaml.safe_load(f)})
    with open(history, "a") as f:
        yaml.safe_dump_all(documents, f, sort_keys=False, explicit_start=True)
    with open(latest, "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)


def save(checkpointer, run, step, params, opt_state):
    checkpointer.save(
        step,
        params=params,
        opt_state=opt_state,
        data_state=run.task.train_iterator.get_state(),
        config=config_to_dict(run.config),
        mesh_shape=run.mesh_shape,
    )


if __name__ == "__main__":
    sys.exit(main())

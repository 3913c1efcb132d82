"""What a training loop shows and records: log lines, the progress bar, ``metrics.jsonl``.

:class:`Log` is one invocation of ``train.py``'s loop: every ``log_every`` steps
a line (``step | loss | lr | units/s``) on stdout (above the tqdm bar, when
``progress_bar`` is on and tqdm is installed) and a record in ``metrics.jsonl``
(``training.metrics.MetricsLogger``). :func:`say` prints a line on process 0 only.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from training.metrics import MetricsLogger, Throughput


def say(*args, file=None):
    """``print`` (flushed) on process 0 only: one line per run, not per host."""
    if jax.process_index() == 0:
        print(*args, file=file or sys.stdout, flush=True)


class Log:
    """Progress bar, log lines and ``metrics.jsonl`` for one invocation of the loop."""

    def __init__(self, run, start, last):
        self.run, self.last = run, last
        self.metrics = MetricsLogger(
            run.config.output_dir, tensorboard=run.config.tensorboard, resume_step=start or None
        )
        self.progress = _progress_bar(run.config, start, enabled=jax.process_index() == 0)
        self.throughput = Throughput()
        self.pending_losses, self.pending_nonfinite = [], []

    def train(self, step, metrics, *, force=False) -> bool:
        """Records one step; logs every ``log_every`` steps, at the last one and
        when ``force``d. Returns False when the logged loss is not finite."""
        task = self.run.task
        self.pending_losses.append(metrics["loss"])
        if "nonfinite_leaves" in metrics:  # leaves zeroed for a step (NaN / inf gradient)
            self.pending_nonfinite.append(metrics["nonfinite_leaves"])
        self.throughput.add(task.units_per_batch)
        self.progress.update(1)
        if not (step % self.run.config.log_every == 0 or step == self.last or force):
            return True
        loss = float(np.mean(jax.device_get(self.pending_losses)))
        nonfinite = int(np.sum(jax.device_get(self.pending_nonfinite)))
        self.pending_losses, self.pending_nonfinite = [], []
        rate = self.throughput.measure()
        record = {
            "loss": loss,
            "lr": float(self.run.lr_schedule(step - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            f"{task.units_name}_per_s": rate,
        }
        if nonfinite:
            record["nonfinite_leaves"] = nonfinite
        self.metrics.log(step, record)
        self.progress.set_postfix(loss=f"{loss:.4f}", **{f"{task.units_name}/s": f"{rate:,.0f}"})
        zeroed = f" | {nonfinite} non-finite leaf gradients zeroed" if nonfinite else ""
        self.write(
            f"step {step:6d} | loss {loss:.4f} | lr {record['lr']:.2e} | "
            f"{rate:,.0f} {task.units_name}/s{zeroed}"
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

"""Metrics output: ``metrics.jsonl`` (always), TensorBoard (optional), throughput.

Only process 0 writes. Each line of ``metrics.jsonl`` is one JSON object, e.g.
``{"step": 10, "loss": 4.1, "lr": 0.001, "tokens_per_s": 5300.0}`` for training
and ``{"step": 100, "val_loss": 3.2, "val_ppl": 24.5}`` for validation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax


def _open_tensorboard(log_dir: str) -> Any:
    """A SummaryWriter from whichever TensorBoard writer is installed, or None."""
    for module, attr in (
        ("tensorboardX", "SummaryWriter"),
        ("torch.utils.tensorboard", "SummaryWriter"),
    ):
        try:
            writer_cls = getattr(__import__(module, fromlist=[attr]), attr)
        except Exception:  # not installed, or broken install: TensorBoard is optional
            continue
        return writer_cls(log_dir)
    return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    """Appends metric records to ``<output_dir>/metrics.jsonl``.

    Args:
      output_dir: run directory.
      resume_step: when resuming from a checkpoint at this step, records of later
        steps (written by the interrupted run after its last checkpoint) are
        dropped, so the file reads as one uninterrupted run.
      tensorboard: also write TensorBoard scalars if a writer is installed.
    """

    def __init__(
        self, output_dir: str, *, resume_step: Optional[int] = None, tensorboard: bool = False
    ):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._drop_after(resume_step)
        elif resume_step is None and os.path.exists(self.path):
            # A fresh run in a directory without checkpoints: start a new log.
            os.replace(self.path, self.path + ".old")
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _open_tensorboard(os.path.join(output_dir, "tensorboard"))
            if self._tb is None:
                print(
                    "warning: tensorboard=true but neither tensorboardX nor torch is"
                    " installed; writing metrics.jsonl only",
                    file=sys.stderr,
                )

    def _drop_after(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one record (``step`` first)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Throughput:
    """Tokens per second between successive ``measure`` calls."""

    def __init__(self):
        self._time = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def measure(self) -> float:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._time, 1e-9)
        self._time, self._tokens = now, 0
        return rate


def read_metrics(output_dir: str) -> list[dict]:
    """All records of ``<output_dir>/metrics.jsonl`` (for tests and analysis)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

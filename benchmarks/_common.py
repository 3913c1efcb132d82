"""Shared helpers for the benchmark scripts (timing, device facts, tables, charts).

Not a test module and not part of the library: the scripts beside it import it
as ``_common`` (``python benchmarks/<script>.py`` puts this folder on sys.path).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# XLA:CPU's concurrency-optimized scheduler hangs intermittently (0% CPU, forever)
# in the batched Cholesky/eigh refresh on a 2-core machine, even on one device;
# tests/conftest.py sets the same flag. It only affects the CPU backend. Set
# before JAX is imported (the scripts import this module first) and inherited by
# the child processes they start.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if CPU_SCHEDULER_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_SCHEDULER_FLAG).strip()

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data
# sheets. Matched by substring of the device kind, first match wins, so the
# more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.4),  # SXM
    ("GH200", 989.4),
    ("A100", 312.0),
)


def peak_bf16_tflops(device_kind: str, override: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of a device kind, or None where unknown (CPU)."""
    if override:
        return float(override)
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def jax_device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": str(dev.device_kind),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
    }


def jax_peak_memory_bytes() -> Optional[int]:
    """``peak_bytes_in_use`` of device 0 where the backend reports it (GPU/TPU), else None."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def time_calls(
    fn: Callable[[], Any],
    *,
    reps: int,
    sync: Callable[[Any], Any],
    on_first: Optional[Callable[[Any], Any]] = None,
) -> dict:
    """Calls ``fn`` once to compile / warm up, then ``reps`` timed times.

    ``sync`` blocks until a result is ready (``jax.block_until_ready``);
    ``on_first`` (optional) gets the warm-up call's result. Returns the warm-up
    time and the median / min / max of the timed calls in seconds.
    """
    start = time.perf_counter()
    out = fn()
    sync(out)
    first = time.perf_counter() - start
    if on_first is not None:
        on_first(out)
    del out
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - start)
        del out
    return {
        "first_call_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }


def model_flops_per_token(matmul_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (matmul params) + 12 L d T attention (PaLM, App. B).

    N counts the weights that take part in matmuls (all but the token
    embedding, which is a gather); the attention term is the QK^T and AV
    products, forward and backward, without discounting the causal mask.
    """
    return 6.0 * matmul_params + 12.0 * num_layers * hidden * seq_len


def fmt_s(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 100:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.3f}"
    if x >= 1e-3:
        return f"{x:.4f}"
    return f"{x:.2e}"


def fmt_ratio(x: Optional[float], base: Optional[float]) -> str:
    if x is None or not base:
        return ""
    return f" ({x / base:.2f}x)"


def fmt_mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a message) when absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # ImportError, or a broken install
        print(
            f"no PNG: matplotlib is not importable ({e}); "
            "pip install matplotlib (or '.[bench]') for the chart",
            file=sys.stderr,
        )
        return None
    return plt


RESULT_PREFIX = "RESULT "


def print_child_result(result: dict) -> None:
    """A child process's answer: one ``RESULT {json}`` line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(
    script: str, child_args: Sequence[str], *, label: str, timeout: float
) -> Optional[dict]:
    """Runs ``python script --child ...`` in its own process; returns its RESULT or None.

    One process per measured variant keeps device memory and its peak the
    variant's own. A failed child prints its output tail and returns None.
    """
    start = time.perf_counter()
    import subprocess

    proc = subprocess.run(
        [sys.executable, script, "--child", *child_args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        print(f"{label}: failed (exit {proc.returncode}); skipped", file=sys.stderr)
        return None
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["wall_s"] = time.perf_counter() - start
    return result


def print_step_summary(name: str, result: dict) -> None:
    """One progress line (stderr) for a timed train-step child."""
    print(
        f"{name:15s} step {result['median_step_s']:.4f} s  amortized "
        f"{result['amortized_step_s']:.4f} s  max {result['max_step_s']:.4f} s  "
        f"state {result['state_bytes'] / 2**20:.2f} MiB  ({result['wall_s']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )

"""Shared helpers for the benchmark scripts (flags, child runs, timing, device facts, tables).

Not a test module and not part of the library: the scripts beside it import it
as ``_common`` (``python benchmarks/<script>.py`` puts this folder on sys.path).
"""

from __future__ import annotations

import argparse
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


# ---------------------------------------------------------------------------
# Command-line pieces shared by the scripts (same flags, defaults and help text)
# ---------------------------------------------------------------------------


# Flags that several scripts take, with one spelling, type, default and help text.
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--config": {"default": str(REPO / "configs" / "llama_tiny.yaml")},
    "--batch-size": {"type": int, "help": "sequences per step (default: the config's)"},
    "--seq-len": {"type": int, "help": "tokens per sequence (default: the config's)"},
    "--accum": {
        "type": int,
        "help": "gradient-accumulation micro-batches per step (default: 1 with "
        "--batch-size, else the config's)",
    },
    "--gap": {"type": int, "help": "update_proj_gap (default: the config's)"},
    "--rank": {"type": int, "help": "GaLore rank (default: the config's)"},
    "--tensor-rank": {
        "type": float,
        "help": "tensor_galore per-mode rank fraction (default: rank / hidden_size)",
    },
    "--peak-tflops": {
        "type": float,
        "help": "peak bf16 TFLOP/s for MFU when the device is not in the table",
    },
    "--timeout": {"type": int, "default": 3600, "help": "seconds per optimizer run"},
}


def add_shared_args(parser: argparse.ArgumentParser, *flags: str) -> None:
    """Adds each of ``flags`` (keys of :data:`SHARED_FLAGS`), in order, as defined there.

    Args:
        parser: The script's parser.
        *flags: Flag names, e.g. ``"--config", "--gap"``.
    """
    for flag in flags:
        parser.add_argument(flag, **SHARED_FLAGS[flag])


def add_windows_arg(parser: argparse.ArgumentParser, *, help: str) -> None:
    """Adds ``--windows`` (default 2); check it with :func:`check_windows` after parsing.

    Args:
        parser: The script's parser.
        help: The flag's help text.
    """
    parser.add_argument("--windows", type=int, default=2, help=help)


def check_windows(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage error where ``--windows`` is below 1 (no step would be timed)."""
    if args.windows < 1:
        parser.error("--windows must be >= 1")


def add_overrides_arg(
    parser: argparse.ArgumentParser, *, help: str = "config override (repeatable)"
) -> None:
    """Adds ``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``.

    Args:
        parser: The script's parser.
        help: The flag's help text (it names what the overrides apply to).
    """
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def add_out_arg(parser: argparse.ArgumentParser, name: str) -> None:
    """Adds ``--out``, the JSON results path (default ``runs/bench/<name>.json``)."""
    parser.add_argument(
        "--out",
        default=str(REPO / "runs" / "bench" / f"{name}.json"),
        help="JSON results ('' to skip)",
    )


def base_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides from the shared LLaMA flags: ``--set``, then batch, sequence, gap, rank.

    Reads ``args.overrides``, ``batch_size``, ``seq_len``, ``gap``, ``rank`` and, where
    the parser has it, ``accum``. ``--batch-size`` without ``--accum`` means one
    micro-batch, so the config's accumulation does not change the batch.
    """
    out = list(args.overrides)
    if args.batch_size:
        out.append(f"batch_size={args.batch_size}")
    accum = getattr(args, "accum", None) or (1 if args.batch_size else None)
    if accum:
        out.append(f"grad_accum_steps={accum}")
    if args.seq_len:
        out.append(f"seq_len={args.seq_len}")
    if args.gap:
        out.append(f"optimizer.update_proj_gap={args.gap}")
    if args.rank:
        out.append(f"optimizer.rank={args.rank}")
    return out


# ---------------------------------------------------------------------------
# One child process per optimizer (train_step.py, peer_torch.py)
# ---------------------------------------------------------------------------


def child_argv(args: argparse.Namespace, keys: Sequence[str]) -> list[str]:
    """The flags that hand the parent's settings on to a child run.

    Args:
        args: The parent's parsed flags (with ``config``, ``windows``, ``overrides``).
        keys: Further ``args`` attributes to pass where set, as ``--key-name=value``.

    Returns:
        ``--config``, ``--windows``, each set key, then one ``--set`` per override.
    """
    argv = [f"--config={args.config}", f"--windows={args.windows}"]
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            argv.append(f"--{key.replace('_', '-')}={value}")
    return argv + [f"--set={o}" for o in args.overrides]


def run_optimizer_children(
    script: str, args: argparse.Namespace, child_args: Sequence[str]
) -> list[dict]:
    """Runs ``script --child NAME ...`` for each of ``args.optimizers``, one after another.

    Args:
        script: The benchmark script (its ``__file__``).
        args: Parsed flags with ``optimizers`` and ``timeout`` (seconds per child).
        child_args: The flags after the optimizer name (see :func:`child_argv`).

    Returns:
        The RESULT of every child that succeeded, in order; each gets a progress line.
    """
    results = []
    for name in args.optimizers:
        result = run_child(script, [name, *child_args], label=name, timeout=args.timeout)
        if result is not None:
            results.append(result)
            print_step_summary(name, result)
    return results


def step_time_stats(
    times: Sequence[float], refreshing: set, gap: int, *, stagger: bool = False
) -> tuple[float, Optional[float], float]:
    """Median, refresh and amortized seconds of a timed run of train steps.

    Step 0 (compile and the first refresh) is left out.

    Args:
        times: Seconds of every step, step 0 first.
        refreshing: Indices of the steps that refresh a projector.
        gap: update_proj_gap.
        stagger: Refreshes are spread over the window: the refresh time is the
            slowest partial refresh and the amortized time the mean over steps
            ``gap .. 2 gap - 1`` (one full window).

    Returns:
        ``(median_step_s, refresh_step_s, amortized_step_s)``; without refreshes
        the refresh time is None and the amortized time the median.
    """
    timed = range(1, len(times))
    plain = [times[i] for i in timed if i not in refreshing]
    refresh = [times[i] for i in timed if i in refreshing]
    median = statistics.median(plain)
    if not refresh:
        return median, None, median
    if stagger:
        return median, max(refresh), statistics.fmean(times[gap : 2 * gap])
    refresh_s = statistics.median(refresh)
    return median, refresh_s, ((gap - 1) * median + refresh_s) / gap


def llama_model_fields(model: Any, *, scan_layers: bool = True) -> dict:
    """The LLaMA config fields a step result records (``scan_layers`` where it applies)."""
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        *(("scan_layers",) if scan_layers else ()),
        "remat",
        "dtype",
        "param_dtype",
    )
    return {k: getattr(model, k) for k in keys}


def model_summary(result: dict) -> str:
    """``<N>M params, <L> layers x d=<d>, f=<f>, compute <dtype>`` of a step result."""
    m = result["model"]
    return (
        f"{result['params'] / 1e6:.2f}M params, {m['num_layers']} layers x d={m['hidden_size']}, "
        f"f={m['intermediate_size']}, compute {m['dtype']}"
    )


def step_throughput(
    config: Any,
    num_params: int,
    embedding_params: int,
    amortized_s: float,
    device_kind: str,
    peak_tflops: Optional[float] = None,
) -> dict:
    """Tokens/s, model FLOPs per token, the device's peak and MFU of a LLaMA train step.

    Args:
        config: The run's training config (``batch_size``, ``seq_len``, ``model``).
        num_params: All parameters.
        embedding_params: The token embedding's (a gather, not a matmul).
        amortized_s: Seconds per step, refreshes amortized.
        device_kind: Looked up in :data:`PEAK_BF16_TFLOPS`.
        peak_tflops: ``--peak-tflops``, which takes precedence over the table.

    Returns:
        ``tokens_per_s``, ``flops_per_token``, ``peak_tflops`` and ``mfu`` (None
        where the peak is unknown), in that order.
    """
    m = config.model
    flops_per_token = model_flops_per_token(
        num_params - embedding_params, m.num_layers, m.hidden_size, config.seq_len
    )
    peak = peak_bf16_tflops(device_kind, peak_tflops)
    tokens_per_s = config.batch_size * config.seq_len / amortized_s
    return {
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "peak_tflops": peak,
        "mfu": flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
    }


# ---------------------------------------------------------------------------
# Printed and written results
# ---------------------------------------------------------------------------


def command_line() -> str:
    """This process's command as ``python <argv>``, for the JSON payloads."""
    return " ".join(["python"] + sys.argv)


def payload(benchmark: str, **fields: Any) -> dict:
    """A JSON payload: ``benchmark``, ``command``, then ``fields`` in their order."""
    return {"benchmark": benchmark, "command": command_line(), **fields}


def print_json_block(obj: Any) -> None:
    """Prints ``obj`` as a fenced JSON block after a blank line (machine-readable tables)."""
    print("\n```json\n" + json.dumps(obj) + "\n```")


def print_step_report(header: str, table: str, results: Sequence[dict]) -> None:
    """Prints a step benchmark's header line, table and results without per-step times."""
    print(header)
    print()
    print(table)
    print_json_block([{k: v for k, v in r.items() if k != "step_times_s"} for r in results])

"""Equal-token convergence: AdamW vs GaLore (randomized, exact) vs optax.contrib.galore.

Runs ``train.py`` once per optimizer (a subprocess each, its own output
directory under ``--out-dir``) with the same config, seed, data order, number
of steps and batch, so every run sees the same tokens; reads each run's
``metrics.jsonl`` and reports the final validation loss and perplexity, the
difference to AdamW, the optimizer-state size train.py reports, and a PNG of
the validation curves against tokens seen.

Learning rates follow the GaLore paper's protocol: the GaLore variants use
``--galore-lr`` (with ``optimizer.scale``, default 0.25), AdamW ``--adamw-lr``;
the defaults take the config's ``optimizer.lr`` for the optimizer the config is
written for and the paper's value (AdamW 1e-3, GaLore 1e-2) for the other.
``optax.contrib.galore`` projects 2-D leaves only, so its run uses unrolled
layers (``model.scan_layers=false``), which draws a different initialisation;
``--unrolled`` unrolls every run so all start from the same weights.

CPU (llama_tiny, about a minute per run):
    python benchmarks/convergence.py --config configs/llama_tiny.yaml --steps 300
Low-bit state against 32-bit GaLore, two seeds (the "vs galore" table):
    python benchmarks/convergence.py --config configs/llama_tiny.yaml --steps 300 \\
        --optimizers galore galore_8bit galore_8bit_int4 --seeds 0 1
GPU (LLaMA-60M, paper shape; a few thousand steps per run):
    python benchmarks/convergence.py --config configs/llama_60m.yaml --steps 2000 \\
        --eval-every 200 --out-dir runs/bench/convergence_60m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as common

OPTIMIZERS = (
    "adamw",
    "galore",
    "galore_exact",
    "optax_galore",
    "galore_8bit",
    "galore_8bit_int4",
    "fira",
    "apollo",
    "apollo_mini",
)
DEFAULT_OPTIMIZERS = ("adamw", "galore", "galore_exact", "optax_galore")
OVERRIDES = {
    "adamw": ["optimizer.name=adamw"],
    "galore": ["optimizer.name=galore", "optimizer.svd=randomized"],
    "galore_exact": ["optimizer.name=galore", "optimizer.svd=exact"],
    "optax_galore": ["optimizer.name=optax_galore", "model.scan_layers=false"],
    # Low-bit state: 8-bit block-wise moments with int8 / int4 projectors.
    "galore_8bit": [
        "optimizer.name=galore",
        "optimizer.svd=randomized",
        "optimizer.adam.bits=8",
        "optimizer.projector.bits=8",
    ],
    "galore_8bit_int4": [
        "optimizer.name=galore",
        "optimizer.svd=randomized",
        "optimizer.adam.bits=8",
        "optimizer.projector.bits=4",
    ],
    # Fira / APOLLO at GaLore's learning rate (their papers use GaLore's settings).
    "fira": ["optimizer.name=fira"],
    "apollo": ["optimizer.name=apollo"],
    "apollo_mini": ["optimizer.name=apollo_mini"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_shared_args(p, "--config")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(DEFAULT_OPTIMIZERS))
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="one run per optimizer and seed (default: the config's seed)",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--eval-every", type=int, default=50, help="validation interval (steps)")
    p.add_argument("--adamw-lr", type=float, help="AdamW peak LR (see the module docstring)")
    p.add_argument("--galore-lr", type=float, help="GaLore peak LR (see the module docstring)")
    p.add_argument(
        "--unrolled",
        action="store_true",
        help="model.scan_layers=false for every run (one shared initialisation)",
    )
    common.add_overrides_arg(p, help="train.py override for every run (repeatable)")
    p.add_argument(
        "--out-dir",
        default=str(common.REPO / "runs" / "bench" / "convergence"),
        help="one train.py output_dir per optimizer under here (replaced)",
    )
    p.add_argument("--png", default=None, help="chart path (default: <out-dir>/convergence.png)")
    p.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per run")
    return p.parse_args(argv)


def learning_rates(args, config) -> dict:
    written_for = config.optimizer.name
    adamw = args.adamw_lr or (config.optimizer.lr if written_for == "adamw" else 1e-3)
    galore = args.galore_lr or (config.optimizer.lr if written_for != "adamw" else 1e-2)
    return {name: adamw if name == "adamw" else galore for name in OPTIMIZERS}


def prepare_run_dir(path: Path) -> None:
    """Empties a previous run of this benchmark (train.py would resume from it)."""
    if not path.exists():
        return
    looks_like_run = any(
        (path / name).exists() for name in ("metrics.jsonl", "config.yaml", "checkpoints")
    )
    if not looks_like_run and any(path.iterdir()):
        raise SystemExit(
            f"{path} exists and is not a train.py run directory; choose another --out-dir"
        )
    shutil.rmtree(path)


def read_metrics(path: Path) -> list[dict]:
    with open(path / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    from tasks.registry import load_config

    config = load_config(args.config, list(args.overrides))
    lrs = learning_rates(args, config)
    tokens_per_step = config.batch_size * config.seq_len
    # Absolute: orbax refuses relative checkpoint paths (train.py passes output_dir on).
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    seeds = args.seeds or [config.seed]
    runs = [(name, seed) for name in args.optimizers for seed in seeds]
    results = []
    for name, seed in runs:
        label = name if len(seeds) == 1 else f"{name}_seed{seed}"
        run_dir = out_dir / label
        prepare_run_dir(run_dir)
        overrides = [
            *args.overrides,
            *OVERRIDES[name],
            f"seed={seed}",
            f"optimizer.lr={lrs[name]}",
            f"steps={args.steps}",
            f"eval_every={args.eval_every}",
            f"output_dir={run_dir}",
            "progress_bar=false",
            "checkpoint.every=0",
        ]
        if args.unrolled:
            overrides.append("model.scan_layers=false")
        command = [
            sys.executable,
            str(common.REPO / "train.py"),
            "--config",
            args.config,
            *overrides,
        ]
        start = time.perf_counter()
        proc = subprocess.run(
            command, cwd=common.REPO, capture_output=True, text=True, timeout=args.timeout
        )
        wall = time.perf_counter() - start
        (out_dir / f"{label}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            print(f"{label}: train.py failed (exit {proc.returncode}); skipped", file=sys.stderr)
            continue
        records = read_metrics(run_dir)
        evals = [r for r in records if "val_loss" in r]
        train = [r for r in records if "loss" in r]
        state = re.search(r"\(([\d.]+) MiB state\)", proc.stdout)
        final = evals[-1]
        results.append(
            {
                "optimizer": name,
                "seed": seed,
                "label": label,
                "lr": lrs[name],
                "steps": final["step"],
                "tokens": final["step"] * tokens_per_step,
                "final_val_loss": final["val_loss"],
                "final_val_ppl": final.get("val_ppl", math.exp(min(final["val_loss"], 700))),
                "final_train_loss": train[-1]["loss"] if train else None,
                "state_mib": float(state.group(1)) if state else None,
                "tokens_per_s": steady_tokens_per_s(train),
                "wall_s": wall,
                "command": " ".join(command[1:]),
                "val_curve": [[r["step"] * tokens_per_step, r["val_loss"]] for r in evals],
                "train_curve": [[r["step"] * tokens_per_step, r["loss"]] for r in train],
            }
        )
        print(
            f"{label:13s} val loss {final['val_loss']:.4f} after {final['step']} steps "
            f"({wall:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    if not results:
        return 1

    headers = [
        "optimizer",
        "seed",
        "peak lr",
        "steps",
        "tokens",
        "final val loss",
        "val ppl",
        "vs adamw",
        "final train loss",
        "tokens/s",
        "opt. state MiB",
        "wall s",
    ]
    rows = []
    for r in results:
        base = same_seed(results, "adamw", r["seed"])
        delta = f"{r['final_val_loss'] - base['final_val_loss']:+.4f}" if base else "-"
        rows.append(
            [
                r["optimizer"],
                r["seed"],
                f"{r['lr']:g}",
                r["steps"],
                f"{r['tokens']:,}",
                f"{r['final_val_loss']:.4f}",
                f"{r['final_val_ppl']:.2f}",
                delta,
                f"{r['final_train_loss']:.4f}" if r["final_train_loss"] is not None else "-",
                f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
                f"{r['state_mib']:.2f}" if r["state_mib"] is not None else "-",
                f"{r['wall_s']:.0f}",
            ]
        )
    m = config.model
    print(
        f"{os.path.relpath(args.config, common.REPO)}: {m.num_layers} layers x "
        f"d={m.hidden_size}, batch {config.batch_size} x {config.seq_len} tokens, rank "
        f"{config.optimizer.rank}, gap {config.optimizer.update_proj_gap}, scale "
        f"{config.optimizer.scale}, seeds {', '.join(map(str, seeds))}; validation every "
        f"{args.eval_every} steps on {config.eval_batches} fixed batches."
    )
    print()
    print(common.markdown_table(headers, rows))
    print()
    print(vs_galore(results, seeds))
    print()
    print(ppl_by_tokens(results))
    summary = [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in results]
    common.print_json_block(summary)
    common.write_json(
        str(out_dir / "convergence.json"), common.payload("convergence", results=results)
    )
    chart(results, args.png or str(out_dir / "convergence.png"), args.config)
    return 0 if len(results) == len(runs) else 1  # every (optimizer, seed) run finished


def same_seed(results: list[dict], optimizer: str, seed: int):
    return next((r for r in results if r["optimizer"] == optimizer and r["seed"] == seed), None)


def vs_galore(results: list[dict], seeds: list[int]) -> str:
    """Mean final validation loss over seeds, and its relative gap to 32-bit `galore`
    on the same seeds (the low-bit variants' acceptance measure)."""
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    galore = [same_seed(results, "galore", s) for s in seeds]
    headers = ["optimizer", "seeds", "mean final val loss", "vs galore (same seeds)"]
    rows = []
    for name in names:
        losses = [r["final_val_loss"] for r in results if r["optimizer"] == name]
        mean = statistics.fmean(losses)
        paired = [(same_seed(results, name, s), g) for s, g in zip(seeds, galore) if g is not None]
        paired = [(r["final_val_loss"], g["final_val_loss"]) for r, g in paired if r is not None]
        gap = (
            f"{100 * (sum(a for a, _ in paired) / sum(b for _, b in paired) - 1):+.2f}%"
            if paired
            else "-"
        )
        rows.append([name, len(losses), f"{mean:.4f}", gap])
    return common.markdown_table(headers, rows)


def steady_tokens_per_s(train: list[dict]):
    """Median train.py throughput over the log intervals after the first (which compiles)."""
    rates = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
    return statistics.median(rates) if rates else None


def ppl_by_tokens(results: list[dict]) -> str:
    """Validation perplexity of every run at each evaluation (equal tokens in a row)."""
    curves = {r["label"]: dict(r["val_curve"]) for r in results}
    tokens = sorted(set.intersection(*(set(c) for c in curves.values())))
    headers = ["tokens"] + [f"{name} val ppl" for name in curves]
    rows = [
        [f"{t:,}"] + [f"{math.exp(min(c[t], 700)):.2f}" for c in curves.values()] for t in tokens
    ]
    return common.markdown_table(headers, rows)


def chart(results, path, config_path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        x, y = zip(*r["val_curve"])
        ax1.plot(x, y, marker="o", markersize=3, label=f"{r['label']} (lr {r['lr']:g})")
        if r["train_curve"]:
            x, y = zip(*r["train_curve"])
            ax2.plot(x, y, label=r["label"], linewidth=1)
    for ax, title in ((ax1, "validation loss"), (ax2, "training loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{os.path.basename(config_path)}: equal-token training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

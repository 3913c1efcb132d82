"""Equal-token convergence: AdamW, the memory-saving baselines and the low-rank optimizers.

Runs ``train.py`` once per (optimizer, learning rate, seed) (a subprocess each,
its own output directory under ``--out-dir``) with the same config, data order,
number of steps and batch, so every run sees the same tokens; reads each run's
``metrics.jsonl`` and reports the final validation loss and perplexity, the
optimizer-state bytes train.py reports, throughput, and PNGs of the validation
curves and of the memory/quality frontier (final loss against state bytes).

Without ``--sweep`` each optimizer runs at one learning rate: ``--adamw-lr`` for
the full-rank ones, ``--galore-lr`` for the low-rank ones (GaLore paper's
protocol; the defaults take the config's ``optimizer.lr`` for the optimizer the
config is written for and the paper's value, AdamW 1e-3 / GaLore 1e-2, for the
other). With ``--sweep`` every optimizer runs its grid (``LR_GRID``, or
``--lr-grid NAME=LR,LR,...``) on the first seed; where the best value is at an
end of the grid the grid is extended by one step (x3) past it, once; the other
seeds run at each optimizer's best learning rate only. The summary compares the
optimizers at their best learning rates, averaged over seeds.

``optax.contrib.galore`` projects 2-D leaves only, so its run uses unrolled
layers (``model.scan_layers=false``), which draws a different initialisation;
``--unrolled`` unrolls every run so all start from the same weights.

CPU (llama_tiny, about a minute per run):
    python benchmarks/convergence.py --config configs/llama_tiny.yaml --steps 300
The comparison in the README (llama_tiny, the main job's 1000 steps, 2 seeds):
    python benchmarks/convergence.py --config configs/llama_tiny.yaml --steps 1000 \\
        --eval-every 100 --sweep --no-extend --seeds 0 1 --jobs 2 --optimizers adamw \\
        galore fira apollo apollo_mini adamw_8bit adafactor muon \\
        --lr-grid adafactor=0.003,0.01,0.03,0.09 --out-dir runs/bench/frontier
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as common

OPTIMIZERS = (
    "adamw",
    "adamw_8bit",
    "adafactor",
    "muon",
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
    "adamw_8bit": ["optimizer.name=adamw", "optimizer.adam.bits=8"],
    "adafactor": ["optimizer.name=adafactor"],
    "muon": ["optimizer.name=muon"],
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
# The optimizers tuned like AdamW (the rest take GaLore's learning rate).
FULL_RANK = ("adamw", "adamw_8bit", "adafactor", "muon")
# --sweep's peak learning rates: each centred on the value its authors use at this
# scale (adafactor's is relative to each param's RMS; muon is RMS-matched to AdamW;
# the low-rank ones multiply by their scale, 0.25 for GaLore / Fira).
LR_GRID = {
    **{name: (1e-3, 3e-3, 1e-2) for name in ("adamw", "adamw_8bit", "muon")},
    "adafactor": (3e-3, 1e-2, 3e-2),
    **{name: (3e-3, 1e-2, 3e-2) for name in OPTIMIZERS if name not in FULL_RANK},
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
        "--sweep",
        action="store_true",
        help="tune each optimizer's peak LR over its grid on the first seed (see above)",
    )
    p.add_argument(
        "--lr-grid",
        action="append",
        default=[],
        metavar="NAME=LR,LR,...",
        help="replace one optimizer's --sweep grid (repeatable)",
    )
    p.add_argument("--jobs", type=int, default=1, help="train.py runs at a time")
    p.add_argument(
        "--no-extend",
        dest="extend",
        action="store_false",
        help="--sweep: do not extend a grid whose best LR is at one end",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep a run whose directory already holds it finished with the same config "
        "(continues an interrupted sweep; the rest are run)",
    )
    p.add_argument(
        "--reuse-only",
        action="store_true",
        help="with --reuse: report the finished runs, run none",
    )
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
    return {name: adamw if name in FULL_RANK else galore for name in OPTIMIZERS}


def lr_grids(args) -> dict:
    grids = dict(LR_GRID)
    for item in args.lr_grid:
        name, _, values = item.partition("=")
        if name not in OPTIMIZERS or not values:
            raise SystemExit(
                f"--lr-grid {item!r}: expected NAME=LR,LR,... with NAME in {OPTIMIZERS}"
            )
        grids[name] = tuple(sorted(float(v) for v in values.split(",")))
    return grids


def best_lr(results: list[dict], optimizer: str):
    """The peak LR with the lowest mean final validation loss over the seeds every LR
    was run with (the sweep's seed: the best LR's other seeds do not pick it again)."""
    runs = [r for r in results if r["optimizer"] == optimizer]
    if not runs:
        return None
    lrs = {r["lr"] for r in runs}
    seeds = set.intersection(*({r["seed"] for r in runs if r["lr"] == lr} for lr in lrs))
    by_lr = {
        lr: statistics.fmean(
            r["final_val_loss"] for r in runs if r["lr"] == lr and r["seed"] in seeds
        )
        for lr in lrs
    }
    return min(by_lr, key=lambda lr: (by_lr[lr], lr))


def edge_extension(results: list[dict], optimizer: str, grid) -> list:
    """One more LR (x3) past the end of the grid the best value sits on, if any."""
    best = best_lr(results, optimizer)
    if best is None or len(grid) < 2:
        return []
    if best == max(grid):
        return [float(f"{best * 3:.3g}")]
    if best == min(grid):
        return [float(f"{best / 3:.3g}")]
    return []


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


def finished_run(run_dir: Path, log: Path, config_path, overrides, steps) -> bool:
    """Whether `run_dir` holds a run of `overrides` that reached `steps` (and its log)."""
    files = (log, run_dir / "config.yaml", run_dir / "metrics.jsonl")
    if not all(f.is_file() for f in files):
        return False
    import yaml

    from tasks.registry import load_config
    from training.config import config_to_dict

    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    if not evals or evals[-1]["step"] != steps:
        return False
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    wanted = config_to_dict(load_config(config_path, overrides))
    wanted.pop("output_dir")  # the runs may have moved
    return _agrees(wanted, saved)


def _agrees(wanted, saved) -> bool:
    """Every value `wanted` sets (None: the task fills it in) is the saved one."""
    if isinstance(wanted, dict):
        return isinstance(saved, dict) and all(
            _agrees(v, saved.get(k)) for k, v in wanted.items() if v is not None
        )
    return wanted is None or wanted == saved


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

    def run(job):
        name, lr, seed = job
        label = f"{name}_lr{lr:g}" if args.sweep else name
        label = label if len(seeds) == 1 else f"{label}_seed{seed}"
        run_dir = out_dir / label
        overrides = [
            *args.overrides,
            *OVERRIDES[name],
            f"seed={seed}",
            f"optimizer.lr={lr}",
            f"steps={args.steps}",
            f"eval_every={args.eval_every}",
            f"output_dir={run_dir}",
            "progress_bar=false",
            "checkpoint.every=0",
        ]
        if args.unrolled:
            overrides.append("model.scan_layers=false")
        command = [sys.executable, str(common.REPO / "train.py"), "--config", args.config]
        command += overrides
        log = out_dir / f"{label}.log"
        if args.reuse and finished_run(run_dir, log, args.config, overrides, args.steps):
            result = run_result(name, lr, seed, label, run_dir, log.read_text(), tokens_per_step)
            result.update(wall_s=None, command=" ".join(command[1:]), reused=True)
            print(f"{label:24s} reused ({result['final_val_loss']:.4f})", file=sys.stderr)
            return result
        if args.reuse_only:
            print(f"{label:24s} not finished; not run (--reuse-only)", file=sys.stderr)
            return None
        prepare_run_dir(run_dir)
        start = time.perf_counter()
        proc = subprocess.run(
            command, cwd=common.REPO, capture_output=True, text=True, timeout=args.timeout
        )
        wall = time.perf_counter() - start
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            print(f"{label}: train.py failed (exit {proc.returncode}); skipped", file=sys.stderr)
            return None
        result = run_result(name, lr, seed, label, run_dir, proc.stdout, tokens_per_step)
        result.update(wall_s=wall, command=" ".join(command[1:]))
        print(
            f"{label:24s} val loss {result['final_val_loss']:.4f} after {result['steps']} "
            f"steps ({wall:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return result

    results: list[dict] = []
    attempted = 0

    def run_all(jobs):
        nonlocal attempted
        attempted += len(jobs)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results.extend(r for r in pool.map(run, jobs) if r is not None)

    if args.sweep:
        grids = lr_grids(args)
        run_all([(n, lr, seeds[0]) for n in args.optimizers for lr in grids[n]])
        if args.extend:
            grow = [(n, lr) for n in args.optimizers for lr in edge_extension(results, n, grids[n])]
            run_all([(n, lr, seeds[0]) for n, lr in grow])
        best = {n: best_lr(results, n) for n in args.optimizers}
        run_all([(n, best[n], s) for s in seeds[1:] for n in args.optimizers if best[n]])
    else:
        run_all([(n, lrs[n], s) for n in args.optimizers for s in seeds])
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
    results.sort(key=lambda r: (args.optimizers.index(r["optimizer"]), r["lr"], r["seed"]))
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
                f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "reused",
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
    tuned = at_best_lr(results)  # without --sweep: every run
    print(vs_galore(tuned, seeds))
    print()
    print(ppl_by_tokens(tuned))
    summary = [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in results]
    common.print_json_block(summary)
    common.write_json(
        str(out_dir / "convergence.json"), common.payload("convergence", results=results)
    )
    chart(tuned, args.png or str(out_dir / "convergence.png"), args.config)
    print()
    print(best_lr_table(results))
    frontier_chart(results, str(out_dir / "frontier.png"), args.config)
    return 0 if len(results) == attempted else 1  # every run finished


def run_result(name, lr, seed, label, run_dir: Path, stdout: str, tokens_per_step: int) -> dict:
    """One finished train.py run, from its metrics.jsonl and its start-up lines."""
    records = read_metrics(run_dir)
    evals = [r for r in records if "val_loss" in r]
    train = [r for r in records if "loss" in r]
    state_mib = re.search(r"\(([\d.]+) MiB state\)", stdout)
    state_bytes = re.search(r"total optimizer state: ([\d,]+) bytes", stdout)
    final = evals[-1]
    return {
        "optimizer": name,
        "seed": seed,
        "label": label,
        "lr": lr,
        "steps": final["step"],
        "tokens": final["step"] * tokens_per_step,
        "final_val_loss": final["val_loss"],
        "final_val_ppl": final.get("val_ppl", math.exp(min(final["val_loss"], 700))),
        "final_train_loss": train[-1]["loss"] if train else None,
        "state_mib": float(state_mib.group(1)) if state_mib else None,
        "state_bytes": int(state_bytes.group(1).replace(",", "")) if state_bytes else None,
        "tokens_per_s": steady_tokens_per_s(train),
        "val_curve": [[r["step"] * tokens_per_step, r["val_loss"]] for r in evals],
        "train_curve": [[r["step"] * tokens_per_step, r["loss"]] for r in train],
    }


def at_best_lr(results: list[dict]) -> list[dict]:
    """Each optimizer's runs at its best peak LR (all runs where it ran at one LR)."""
    best = {r["optimizer"]: best_lr(results, r["optimizer"]) for r in results}
    return [r for r in results if r["lr"] == best[r["optimizer"]]]


def same_seed(results: list[dict], optimizer: str, seed: int):
    """The run of `optimizer` on `seed`, at its best LR where several were run."""
    best = best_lr(results, optimizer)
    return next(
        (
            r
            for r in results
            if r["optimizer"] == optimizer and r["seed"] == seed and r["lr"] == best
        ),
        None,
    )


def best_lr_table(results: list[dict]) -> str:
    """Each optimizer at its best LR: mean over seeds, against AdamW's, and its state bytes."""
    tuned = at_best_lr(results)
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    base = [r["final_val_loss"] for r in tuned if r["optimizer"] == "adamw"]
    base_state = next((r["state_bytes"] for r in tuned if r["optimizer"] == "adamw"), None)
    headers = [
        "optimizer",
        "LRs tried",
        "best lr",
        "seeds",
        "mean final val loss",
        "val ppl",
        "vs adamw",
        "opt. state bytes",
        "x adamw state",
        "tokens/s",
    ]
    rows = []
    for name in names:
        runs = [r for r in tuned if r["optimizer"] == name]
        loss = statistics.fmean(r["final_val_loss"] for r in runs)
        tried = sorted({r["lr"] for r in results if r["optimizer"] == name})
        state = runs[0]["state_bytes"]
        rates = [r["tokens_per_s"] for r in runs if r["tokens_per_s"]]
        rows.append(
            [
                name,
                ", ".join(f"{lr:g}" for lr in tried),
                f"{runs[0]['lr']:g}",
                len(runs),
                f"{loss:.4f}",
                f"{math.exp(loss):.2f}",
                f"{100 * (loss / statistics.fmean(base) - 1):+.2f}%" if base else "-",
                f"{state:,}" if state is not None else "-",
                f"{state / base_state:.3f}" if state is not None and base_state else "-",
                f"{statistics.median(rates):,.0f}" if rates else "-",
            ]
        )
    return common.markdown_table(headers, rows)


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


def frontier_chart(results, path, config_path) -> None:
    """Final validation loss (mean over seeds, best LR) against optimizer-state bytes."""
    plt = common.pyplot()
    tuned = [r for r in at_best_lr(results) if r["state_bytes"]]
    if plt is None or not tuned:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["optimizer"] for r in tuned):
        runs = [r for r in tuned if r["optimizer"] == name]
        loss = statistics.fmean(r["final_val_loss"] for r in runs)
        state = runs[0]["state_bytes"]
        ax.scatter([state], [loss], s=40)
        ax.annotate(
            f"{name} (lr {runs[0]['lr']:g})",
            (state, loss),
            fontsize=8,
            xytext=(5, 3),
            textcoords="offset points",
        )
        if len(runs) > 1:
            losses = [r["final_val_loss"] for r in runs]
            ax.vlines(state, min(losses), max(losses), alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state (bytes, log scale)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"{os.path.basename(config_path)}: memory / quality frontier (best LR, seed mean)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

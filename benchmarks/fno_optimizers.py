"""AdamW vs GaLore vs Tensor-GaLore on FNO (Darcy, Burgers): memory, accuracy, speed.

For each dataset x optimizer, with the same data, seed, model init, batch order
and number of steps, measures:

* optimizer-state bytes, from the state itself (``gj.memory_report``), total
  and for the spectral (complex) weights alone;
* peak device memory from ``jax.devices()[0].memory_stats()`` where the
  backend reports it ("n/a" on CPU);
* test relative L2 after the last step (the ``val_l2`` of ``train.py``);
* median seconds per optimizer step (and the mean, which includes the
  projection refreshes every ``update_proj_gap`` steps).

Every run is a fresh subprocess (so peak memory is per run), built from
``configs/fno_<dataset>.yaml`` with the same pieces as ``train.py``
(``tasks.fno.task``, ``training.optim.build_optimizer``). Prints a markdown
table and writes JSON::

    python benchmarks/fno_optimizers.py --steps 300 --out fno_bench.json
    python benchmarks/fno_optimizers.py --steps 1000 \\
        --set-for tensor_galore optimizer.scale=1.0 --set-for tensor_galore optimizer.lr=6e-3

The Tucker rank of Tensor-GaLore follows the configs: ``optimizer.rank: 0.25``
with ``optimizer.tensor_rank_mode: params`` (the core plus factors hold 25% of
each spectral tensor's entries, the Tensor-GaLore paper's meaning); try
``--set optimizer.tensor_rank_mode=mode`` for galore_jax's per-mode fraction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import _common as common

REPO = common.REPO

OPTIMIZERS = ("adamw", "galore", "tensor_galore")
DATASETS = ("darcy", "burgers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order")
    common.add_overrides_arg(p, help="config override for every run (repeatable)")
    p.add_argument(
        "--set-for",
        dest="per_optimizer",
        action="append",
        default=[],
        nargs=2,
        metavar=("OPTIMIZER", "KEY=VALUE"),
        help="config override for one optimizer's runs (repeatable), e.g. "
        "--set-for tensor_galore optimizer.lr=6e-3",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--child", nargs=2, metavar=("DATASET", "OPTIMIZER"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# One run (in a child process)
# ---------------------------------------------------------------------------


def run_one(dataset: str, optimizer: str, args) -> dict:
    import jax
    import numpy as np

    import galore_jax as gj
    from tasks.registry import load_config
    from training import mesh as mesh_lib
    from training import optim, steps

    overrides = [
        *args.overrides,
        *(kv for opt, kv in args.per_optimizer if opt == optimizer),
        f"steps={args.steps}",
        f"seed={args.seed}",
        f"optimizer.name={optimizer}",
        "progress_bar=false",
    ]
    config = load_config(str(REPO / "configs" / f"fno_{dataset}.yaml"), overrides)
    run = steps.build_run(config, jax.device_count())
    opt_cfg = run.config.optimizer
    spectral_shapes = sorted(
        {tuple(x.shape) for x in jax.tree.leaves(run.abstract_params) if jax.numpy.iscomplexobj(x)}
    )
    if optimizer == "tensor_galore" and opt_cfg.tensor_rank_mode == "params":
        tensor_rank = list(optim.tucker_ranks_for_param_fraction(spectral_shapes[0], opt_cfg.rank))
    else:
        tensor_rank = opt_cfg.rank
    with mesh_lib.use_mesh(run.mesh):
        params, opt_state, _ = steps.init_or_restore(run, None)
        train_step, eval_step = steps.make_train_step(run), steps.make_eval_step(run)
        report = gj.memory_report(opt_state, params)
        spectral_params = {k: v for k, v in _flat(params).items() if np.iscomplexobj(v)}
        spectral_adamw = gj.memory.adamw_state_bytes(spectral_params) - 4

        times, losses = [], []
        for _ in range(config.steps):
            batches = steps.next_train_batches(run)
            start = time.perf_counter()
            params, opt_state, metrics = train_step(params, opt_state, batches)
            jax.block_until_ready((params, opt_state, metrics))
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
        val_l2 = steps.evaluate(run, eval_step, params)["val_l2"]

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    steady = times[1:] or times
    gap = opt_cfg.update_proj_gap
    refresh_times = [t for i, t in enumerate(times) if i > 0 and i % gap == 0]
    return {
        "dataset": dataset,
        "optimizer": optimizer,
        "steps": config.steps,
        "seed": config.seed,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "spectral_shapes": [list(s) for s in spectral_shapes],
        "tensor_rank": tensor_rank,
        "optimizer_config": {
            k: getattr(opt_cfg, k)
            for k in (
                "lr",
                "rank",
                "tensor_rank_mode",
                "update_proj_gap",
                "scale",
                "svd",
                "label_overrides",
            )
        },
        "state_bytes": int(report["total_bytes"]),
        "state_bytes_per_label": report["per_label"],
        "adamw_state_bytes": int(report["adamw_bytes"]),
        "spectral_state_bytes": _spectral_state_bytes(report, optimizer, spectral_adamw),
        "spectral_adamw_state_bytes": int(spectral_adamw),
        "peak_device_bytes": int(peak) if peak is not None else None,
        "val_l2": val_l2,
        "final_train_loss": float(np.mean(losses[-10:])),
        "median_step_s": statistics.median(steady),
        "mean_step_s": statistics.fmean(steady),
        "first_step_s": times[0],
        "max_step_s": max(steady),
        # Steps where GaLore / Tensor-GaLore refresh their projections (AdamW: same steps).
        "refresh_step_s": statistics.median(refresh_times) if refresh_times else None,
        "step_times_s": times,
        "device": str(jax.devices()[0].device_kind),
        "config": {
            "model": vars(config.model),
            "data": vars(config.data),
            "batch_size": config.batch_size,
        },
    }


def _flat(tree):
    import jax

    import galore_jax as gj

    return {gj.paths.path_string(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _spectral_state_bytes(report, optimizer, spectral_adamw):
    """State of the spectral weights: the low-rank label's bytes (GaLore variants)."""
    if optimizer == "adamw":
        return int(spectral_adamw)
    return int(report["per_label"].get(optimizer, 0))


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _mib(n):
    return f"{n / 2**20:.3f}"


def table(results) -> str:
    lines = [
        "| dataset | optimizer | lr | scale | opt. state MiB | vs AdamW | spectral state MiB"
        " | peak device MiB | test rel. L2 | vs AdamW | median s/step | mean s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["dataset"]): r for r in results if r["optimizer"] == "adamw"}
    for r in results:
        b = base.get(r["dataset"])
        state_vs = f"{r['state_bytes'] / b['state_bytes']:.0%}" if b else "-"
        l2_vs = f"{r['val_l2'] / b['val_l2'] - 1:+.1%}" if b else "-"
        peak = _mib(r["peak_device_bytes"]) if r["peak_device_bytes"] is not None else "n/a"
        lines.append(
            f"| {r['dataset']} | {r['optimizer']} | {r['optimizer_config']['lr']:g} | "
            f"{r['optimizer_config']['scale'] if r['optimizer'] != 'adamw' else '-'} | "
            f"{_mib(r['state_bytes'])} | {state_vs} | "
            f"{_mib(r['spectral_state_bytes'])} | {peak} | {r['val_l2']:.4f} | {l2_vs} | "
            f"{r['median_step_s']:.4f} | {r['mean_step_s']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        common.print_child_result(run_one(*args.child, args))
        return 0

    child_args = [f"--steps={args.steps}", f"--seed={args.seed}", f"--timeout={args.timeout}"]
    child_args += [f"--set={o}" for o in args.overrides]
    for opt, kv in args.per_optimizer:
        child_args += ["--set-for", opt, kv]
    results = []
    for dataset in args.datasets:
        for optimizer in args.optimizers:
            result = common.run_child(
                __file__,
                [dataset, optimizer, *child_args],
                label=f"{dataset}/{optimizer}",
                timeout=args.timeout,
            )
            if result is None:
                raise SystemExit(f"{dataset}/{optimizer} failed")
            results.append(result)
            print(
                f"{dataset:8s} {optimizer:14s} val_l2 {result['val_l2']:.4f}  state "
                f"{_mib(result['state_bytes'])} MiB  median {result['median_step_s']:.4f} s/step"
                f"  ({result['wall_s']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

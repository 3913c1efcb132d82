"""LLaMA train-step time, throughput, MFU and memory: AdamW vs the GaLore variants.

For one model config (``configs/llama_*.yaml``) and a list of optimizers, each
optimizer runs in its own subprocess (so device memory and its peak are its
own), built exactly as ``train.py`` builds it (``training.task.build_task``,
``training.optim.build_optimizer``, the model's stacked-layer axes as GaLore
batch axes), with one jitted, donated train step: loss and gradients (with
gradient accumulation if asked), clipping, the optimizer update, apply.

Each run does ``1 + windows * gap`` steps: step 0 (compile and the first
refresh) is left out, then ``windows`` full refresh windows are timed step by
step with ``jax.block_until_ready``. Reported per optimizer (see
benchmarks/README.md for the exact definitions):

  step s       median over steps that refresh no projector
  refresh s    median over refresh steps (stagger: the slowest partial refresh)
  amortized s  ((gap - 1) * step + refresh) / gap (stagger: mean over one full window)
  max s        slowest timed step (max / median: the spike)
  tokens/s     tokens per step / amortized
  MFU          (6 N + 12 L d T) * tokens/s / peak bf16 FLOP/s ("n/a" where the peak is unknown)
  state MiB    optimizer-state bytes (galore_jax.optimizer_state_bytes of the state)
  peak MiB     device peak_bytes_in_use ("n/a" on CPU)

CPU (llama_tiny, ~2-3 minutes):
    python benchmarks/train_step.py --config configs/llama_tiny.yaml --batch-size 8 --gap 10
GPU (the measured-peers shape: LLaMA-1B, batch 32 x 256, bf16 compute, rank 512, gap 200):
    python benchmarks/train_step.py --config configs/llama_1b.yaml --batch-size 32 \\
        --seq-len 256 --gap 200 --windows 1 --out runs/bench/train_step_1b.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import _common as common

OPTIMIZERS = ("adamw", "galore", "galore_exact", "galore_stagger", "tensor_galore", "optax_galore")
# adamw_unrolled: the fair baseline for optax_galore's unrolled model;
# galore_reverse_std: projects the larger side of each matrix (as optax.contrib does),
# so the low-rank moments are min(m, n) x r instead of max(m, n) x r.
# *_8bit: block-wise 8-bit Adam moments (and int8 / int4 projectors for GaLore).
# galore_jacobi: the refresh's eigh by Jacobi (GPU / TPU only).
EXTRA = (
    "adamw_unrolled",
    "galore_reverse_std",
    "adamw_8bit",
    "galore_8bit",
    "galore_8bit_int4",
    "galore_layerwise",
    "galore_jacobi",
    "galore_master",
    "fira",
    "apollo",
    "apollo_svd",
    "apollo_mini",
    "apollo_mini_8bit",
)
DESCRIPTIONS = {
    "adamw": "optax.adamw",
    "galore": "galore_adamw, randomized SVD (warm start)",
    "galore_exact": "galore_adamw, exact SVD",
    "galore_stagger": "galore_adamw, randomized, staggered refreshes",
    "tensor_galore": "tensor_galore_adamw (Tucker of each stacked (L, m, n) weight)",
    "optax_galore": "optax.contrib.galore (exact SVD, unrolled layers)",
    "adamw_unrolled": "optax.adamw, unrolled layers",
    "galore_reverse_std": "galore_adamw, randomized, proj_type=reverse_std",
    "adamw_8bit": "adamw, 8-bit block-wise moments",
    "galore_8bit": "galore_adamw, randomized, 8-bit moments, int8 projectors",
    "galore_8bit_int4": "galore_adamw, randomized, 8-bit moments, int4 projectors",
    "galore_layerwise": "galore_adamw, randomized, layer-wise (per-layer clipping)",
    "galore_jacobi": "galore_adamw, randomized, Jacobi eigh (cuSOLVER syevj; GPU only)",
    "galore_master": "galore_adamw, randomized, float32 master of 16-bit params",
    "fira": "fira_adamw, randomized SVD (GaLore's state + a norm per matrix)",
    "apollo": "apollo_adamw, random projection (a key per matrix)",
    "apollo_svd": "apollo_adamw, randomized SVD projectors",
    "apollo_mini": "apollo_mini_adamw (rank 1, one scale per matrix)",
    "apollo_mini_8bit": "apollo_mini_adamw, 8-bit moments",
}
# Variants = a base variant plus config overrides.
DERIVED = {
    "adamw_8bit": ("adamw", ["optimizer.adam.bits=8"]),
    "galore_8bit": ("galore", ["optimizer.adam.bits=8", "optimizer.projector_bits=8"]),
    "galore_8bit_int4": ("galore", ["optimizer.adam.bits=8", "optimizer.projector_bits=4"]),
    "galore_layerwise": ("galore", ["optimizer.layerwise=true", "optimizer.grad_clip_mode=layer"]),
    "galore_jacobi": ("galore", ["optimizer.eigh_implementation=jacobi"]),
    "galore_master": ("galore", ["optimizer.master_dtype=float32"]),  # with bf16 params
    "apollo_svd": ("apollo", ["optimizer.projection=svd"]),
    "apollo_mini_8bit": ("apollo_mini", ["optimizer.adam.bits=8"]),
}


def variant_overrides(name: str, args) -> list[str]:
    """Config overrides that select one optimizer variant."""
    if name in DERIVED:
        base, extra = DERIVED[name]
        return variant_overrides(base, args) + extra
    if name == "adamw":
        return ["optimizer.name=adamw"]
    if name == "adamw_unrolled":
        return ["optimizer.name=adamw", "model.scan_layers=false"]
    if name == "galore":
        return ["optimizer.name=galore", "optimizer.svd=randomized", "optimizer.stagger=false"]
    if name == "galore_exact":
        return ["optimizer.name=galore", "optimizer.svd=exact", "optimizer.stagger=false"]
    if name == "galore_reverse_std":
        return [
            "optimizer.name=galore",
            "optimizer.svd=randomized",
            "optimizer.stagger=false",
            "optimizer.proj_type=reverse_std",
        ]
    if name == "galore_stagger":
        return ["optimizer.name=galore", "optimizer.svd=randomized", "optimizer.stagger=true"]
    if name == "tensor_galore":
        # An int rank would exceed the layer mode of a stacked (L, m, n) weight;
        # keep the same fraction of every mode as the matrix rank keeps of d.
        return [
            "optimizer.name=tensor_galore",
            f"optimizer.rank={args.tensor_rank}",
            "optimizer.stagger=false",
        ]
    if name in ("fira", "apollo", "apollo_mini"):
        return [f"optimizer.name={name}", "optimizer.svd=randomized", "optimizer.stagger=false"]
    if name == "optax_galore":
        # optax.contrib.galore projects 2-D leaves only: unrolled layers.
        return ["optimizer.name=optax_galore", "model.scan_layers=false"]
    raise ValueError(name)


def add_optimizers_arg(
    parser: argparse.ArgumentParser, default: Sequence[str], help: Optional[str] = None
) -> None:
    """Adds ``--optimizers``: any of the variants above (update_cost.py builds the same)."""
    parser.add_argument(
        "--optimizers", nargs="+", choices=OPTIMIZERS + EXTRA, default=list(default), help=help
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_shared_args(p, "--config")
    add_optimizers_arg(p, OPTIMIZERS, help=f"default: {' '.join(OPTIMIZERS)}")
    common.add_shared_args(
        p, "--batch-size", "--seq-len", "--accum", "--gap", "--rank", "--tensor-rank"
    )
    common.add_windows_arg(p, help="refresh windows of `gap` steps to time (stagger needs 2)")
    common.add_overrides_arg(p, help="config override for every run (repeatable)")
    common.add_shared_args(p, "--peak-tflops")
    common.add_out_arg(p, "train_step")
    p.add_argument(
        "--png", default=None, help="chart path (default: the JSON path with .png; '' to skip)"
    )
    p.add_argument(
        "--update-reps",
        type=int,
        default=10,
        help="timed calls of the optimizer update alone (0: skip that column)",
    )
    common.add_shared_args(p, "--timeout")
    p.add_argument(
        "--state-only",
        action="store_true",
        help="only print each optimizer's state bytes per label, from the abstract "
        "state (no step is run, nothing is allocated: any model size on CPU)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.check_windows(p, args)
    return args


def load(args, name):
    from tasks.registry import load_config

    if args.tensor_rank is None:
        config = load_config(args.config, common.base_overrides(args))
        rank = config.optimizer.rank
        args.tensor_rank = rank / config.model.hidden_size if isinstance(rank, int) else rank
    return load_config(args.config, common.base_overrides(args) + variant_overrides(name, args))


# ---------------------------------------------------------------------------
# One optimizer (child process)
# ---------------------------------------------------------------------------


def refresh_steps(name: str, opt_cfg, num_galore_leaves: int, total: int) -> set:
    """Indices (0-based, = optimizer count before the step) of steps that refresh."""
    gap = opt_cfg.update_proj_gap
    if name.startswith("adamw"):
        return set()
    if opt_cfg.stagger:
        import galore_jax as gj

        offsets = set(gj._low_rank.refresh_offsets(num_galore_leaves, gap, True))
        return {0} | {i for i in range(gap, total) if i % gap in offsets}
    return {i for i in range(total) if i % gap == 0}


def build(name: str, args):
    """The ``training.steps.Run`` of one variant, as train.py builds it (nothing allocated)."""
    import jax

    from training import steps

    return steps.build_run(load(args, name), jax.device_count())


def state_only(args) -> int:
    """--state-only: optimizer-state bytes per label from the abstract state."""
    import jax

    import galore_jax as gj

    rows = []
    for name in args.optimizers:
        run = build(name, args)
        config, abstract_params = run.config, run.abstract_params
        report = gj.memory_report(run.abstract_opt_state, abstract_params)
        dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(abstract_params)})
        rows.append(
            {"optimizer": name, "description": DESCRIPTIONS[name], "param_dtypes": dtypes, **report}
        )
    gib = lambda b: f"{b / 2**30:.3f}"
    print(
        f"Optimizer state of {args.config} (params {', '.join(rows[0]['param_dtypes'])}; "
        f"rank {config.optimizer.rank}), from the abstract state (jax.eval_shape of "
        "init: nothing allocated). Ratio: to AdamW's two moments.\n"
    )
    labels = sorted({k for r in rows for k in r["per_label"] if k != "other"})
    headers = [
        "optimizer",
        "what",
        "state bytes",
        "state GiB",
        "vs AdamW",
        *(f"{k} GiB" for k in labels),
    ]
    print(
        common.markdown_table(
            headers,
            [
                [
                    r["optimizer"],
                    r["description"],
                    f"{r['total_bytes']:,}",
                    gib(r["total_bytes"]),
                    f"{r['ratio_to_adamw']:.2f}x",
                    *(
                        gib(r["per_label"].get(k, 0)) if set(r["per_label"]) != {"other"} else "-"
                        for k in labels
                    ),
                ]
                for r in rows
            ],
        )
    )
    common.print_json_block(rows)
    common.write_json(args.out, common.payload("train_step --state-only", results=rows))
    return 0


def run_child(name: str, args) -> dict:
    import jax
    import numpy as np

    import galore_jax as gj
    from training import mesh as mesh_lib
    from training import steps

    run = build(name, args)
    config, opt_cfg, tx = run.config, run.config.optimizer, run.tx
    abstract_params = run.abstract_params
    accum = config.grad_accum_steps
    with mesh_lib.use_mesh(run.mesh):
        params, opt_state, _ = steps.init_or_restore(run, None)
        train_step = steps.make_train_step(run)
        batches = [steps.next_train_batches(run) for _ in range(4)]  # on the device before timing
    state_bytes = int(gj.memory.optimizer_state_bytes(opt_state))
    labels = gj.galore_labels(
        abstract_params,
        dimension_numbers=run.dimension_numbers,
        label_overrides=opt_cfg.label_overrides,
    )
    num_galore = sum(1 for x in jax.tree.leaves(labels) if x == "galore")

    gap = opt_cfg.update_proj_gap
    windows = max(args.windows, 2) if opt_cfg.stagger else args.windows
    total = 1 + windows * gap
    times, losses = [], []
    for i in range(total):
        start = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, batches[i % len(batches)])
        jax.block_until_ready((params, opt_state, metrics))
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
    peak = common.jax_peak_memory_bytes()
    # A layer-wise step has no separate update (it runs inside the backward pass).
    update_s = (
        None if run.layerwise else time_update_alone(tx, params, opt_state, reps=args.update_reps)
    )

    refreshing = refresh_steps(name, opt_cfg, num_galore, total)
    median, refresh_s, amortized = common.step_time_stats(
        times, refreshing, gap, stagger=opt_cfg.stagger
    )

    sizes = {
        gj.paths.path_string(path): int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    num_params = sum(sizes.values())
    embedding = sum(v for k, v in sizes.items() if "embedding" in k)
    m = config.model
    info = common.jax_device_info()
    return {
        "optimizer": name,
        "description": DESCRIPTIONS[name],
        "device": info,
        "config": args.config,
        "overrides": common.base_overrides(args) + variant_overrides(name, args),
        "model": common.llama_model_fields(m),
        "params": num_params,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "grad_accum_steps": accum,
        "tokens_per_step": config.batch_size * config.seq_len,
        "optimizer_config": {
            k: getattr(opt_cfg, k)
            for k in (
                "rank",
                "update_proj_gap",
                "svd",
                "stagger",
                "scale",
                "oversample",
                "power_iters",
                "warm_start",
            )
        },
        "num_galore_leaves": num_galore,
        "windows": windows,
        "first_step_s": times[0],
        "median_step_s": median,
        "refresh_step_s": refresh_s,
        "refresh_steps": sorted(refreshing),
        "amortized_step_s": amortized,
        "max_step_s": max(times[1:]),
        "update_alone_s": update_s,
        **common.step_throughput(
            config, num_params, embedding, amortized, info["device_kind"], args.peak_tflops
        ),
        "state_bytes": state_bytes,
        "adamw_state_bytes": int(gj.memory.adamw_state_bytes(params)),
        "peak_device_bytes": peak,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "step_times_s": times,
    }


def time_update_alone(tx, params, opt_state, *, reps: int):
    """Median seconds of the optimizer update alone (no forward/backward), between refreshes.

    The step loop ends one step after a refresh window, so the state's count is
    not a refresh step (with stagger and a gap not much larger than the number
    of projected leaves, count % gap == 1 can be one leaf's offset). Gradients are
    random (the update's cost does not depend on their values); nothing is
    donated, so the state is reused across calls. Step time minus this is the
    forward/backward, clipping and apply.
    """
    if reps <= 0:
        return None
    import jax

    grads = jax.jit(
        lambda p: jax.tree.map(
            lambda x: 1e-3 * jax.random.normal(jax.random.PRNGKey(0), x.shape, x.dtype), p
        )
    )(params)
    update = jax.jit(tx.update)
    timing = common.time_calls(
        lambda: update(grads, opt_state, params), reps=reps, sync=jax.block_until_ready
    )
    return timing["median_s"]


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["optimizer"] == "adamw"), None)
    b = (lambda key: base.get(key)) if base else (lambda key: None)  # noqa: E731
    gap = results[0]["optimizer_config"]["update_proj_gap"]
    headers = [
        "optimizer",
        "step s",
        "update alone s",
        "refresh step s",
        f"amortized s (gap {gap})",
        "max step s",
        "max/median",
        "tokens/s",
        "MFU",
        "opt. state MiB",
        "peak device MiB",
    ]
    rows = []
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        rows.append(
            [
                r["optimizer"],
                common.fmt_s(r["median_step_s"])
                + common.fmt_ratio(r["median_step_s"], b("median_step_s")),
                common.fmt_s(r.get("update_alone_s"))
                + common.fmt_ratio(r.get("update_alone_s"), b("update_alone_s")),
                common.fmt_s(r["refresh_step_s"])
                + common.fmt_ratio(r["refresh_step_s"], b("median_step_s")),
                common.fmt_s(r["amortized_step_s"])
                + common.fmt_ratio(r["amortized_step_s"], b("amortized_step_s")),
                common.fmt_s(r["max_step_s"]) + common.fmt_ratio(r["max_step_s"], b("max_step_s")),
                f"{r['max_step_s'] / r['median_step_s']:.2f}",
                f"{r['tokens_per_s']:,.0f}",
                mfu,
                common.fmt_mib(r["state_bytes"])
                + (f" ({r['state_bytes'] / base['state_bytes']:.2f}x)" if base else ""),
                common.fmt_mib(r["peak_device_bytes"]),
            ]
        )
    return common.markdown_table(headers, rows)


def header(results: list[dict]) -> str:
    r = results[0]
    return (
        f"{r['device']['device_kind']} ({r['device']['platform']}, jax "
        f"{r['device']['jax']}); {os.path.relpath(r['config'], common.REPO)}: "
        f"{common.model_summary(r)}, params {r['model']['param_dtype']}; "
        f"batch {r['batch_size']} x {r['seq_len']} tokens (accum {r['grad_accum_steps']}); "
        f"rank {r['optimizer_config']['rank']}, gap {r['optimizer_config']['update_proj_gap']}; "
        f"{r['windows']} window(s) of gap steps timed after step 0. Ratios are to adamw "
        "(refresh step: to adamw's step)."
    )


def chart(results: list[dict], path: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    import numpy as np

    names = [r["optimizer"] for r in results]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [
        ("median step", "median_step_s"),
        ("amortized", "amortized_step_s"),
        ("max step", "max_step_s"),
    ]
    width = 0.27
    for k, (label, key) in enumerate(series):
        ax1.bar(x + (k - 1) * width, [r[key] for r in results], width, label=label)
    ax1.set_xticks(x, names, rotation=30, ha="right")
    ax1.set_ylabel("seconds per step")
    ax1.set_title("train step time")
    ax1.legend()
    ax2.bar(x, [r["state_bytes"] / 2**20 for r in results], color="tab:gray")
    ax2.set_xticks(x, names, rotation=30, ha="right")
    ax2.set_ylabel("MiB")
    ax2.set_title("optimizer state")
    r = results[0]
    fig.suptitle(
        f"{os.path.basename(r['config'])} on {r['device']['device_kind']}: "
        f"batch {r['batch_size']}x{r['seq_len']}, gap "
        f"{r['optimizer_config']['update_proj_gap']}"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


# The flags (besides --config, --windows, --set) a child needs to rebuild its run.
CHILD_KEYS = (
    "batch_size",
    "seq_len",
    "accum",
    "gap",
    "rank",
    "tensor_rank",
    "peak_tflops",
    "update_reps",
)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        common.print_child_result(run_child(args.child, args))
        return 0
    if args.state_only:
        return state_only(args)

    results = common.run_optimizer_children(__file__, args, common.child_argv(args, CHILD_KEYS))
    if not results:
        return 1
    common.print_step_report(header(results), table(results), results)
    common.write_json(args.out, common.payload("train_step", results=results))
    png = (
        args.png
        if args.png is not None
        else (os.path.splitext(args.out)[0] + ".png" if args.out else "")
    )
    if png:
        chart(results, png)
    return 0 if len(results) == len(args.optimizers) else 1


if __name__ == "__main__":
    sys.exit(main())

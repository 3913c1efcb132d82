"""Memory of the whole compiled train step, per optimizer variant (standard vs layer-wise).

For each variant, the step train.py runs (``training.steps.make_train_step``) is
lowered with abstract inputs and compiled, nothing allocated, and XLA's memory
analysis of it reported:

  peak        arguments + outputs - aliased (donated params and state) + temporaries
  arguments   params, optimizer state and batch passed in
  temps       XLA's temporary buffers (gradients, activations, the optimizer's scratch)

beside byte counts from shapes: params, optimizer state (``galore_jax``'s
``optimizer_state_bytes``), the gradient alive at once (the whole tree for a
standard step; the largest of one layer, the embedding and the head for a
layer-wise one) and the activations a rematerialised step keeps (each layer's
input, plus the float32 logits). On a GPU, ``--run-steps N`` also runs N real
steps per variant (one process each) and reports the device's
``peak_bytes_in_use``.

XLA:CPU computes bf16 dots in f32, so CPU compiles of bf16-param models
overstate temporaries by about the params' f32 size: CPU tables use f32 params.

CPU, LLaMA-1B (f32 params, batch 8 x 256, remat; a few minutes on 2 cores):
    python benchmarks/memory.py --config configs/llama_1b.yaml --batch-size 8 \\
        --seq-len 256 --set model.remat=true --set model.vocab_size=32000
Bytes through collectives per step on 8 CPU devices (data-parallel), from the
compiled HLO: steady steps, refresh steps, and amortized over the refresh gap:
    python benchmarks/memory.py --config configs/llama_60m.yaml --devices 8 \\
        --set mesh.data=8 --rank 128 --variants adamw galore --collectives
GPU (bf16 params, real steps too):
    python benchmarks/memory.py --config configs/llama_1b.yaml --batch-size 8 \\
        --seq-len 256 --set model.remat=true --set model.vocab_size=32000 \\
        --set model.param_dtype=bfloat16 --set model.dtype=bfloat16 --run-steps 3
"""

from __future__ import annotations

import argparse
import math
import os

import _collectives
import _common as common

# Layer-wise updates clip per layer (a step of theirs never holds the global norm).
LAYERWISE = ["optimizer.layerwise=true", "optimizer.grad_clip_mode=layer"]
LOW_BIT = ["optimizer.adam.bits=8", "optimizer.projector.bits=8"]
VARIANTS = {
    "adamw": (["optimizer.name=adamw"], "optax.adamw, standard step"),
    "galore": (["optimizer.name=galore"], "galore_adamw, standard step"),
    "galore_layerwise": (["optimizer.name=galore", *LAYERWISE], "galore_adamw, layer-wise"),
    "galore_8bit": (
        ["optimizer.name=galore", *LOW_BIT],
        "galore_adamw, 8-bit moments, int8 projectors",
    ),
    "galore_layerwise_8bit": (
        ["optimizer.name=galore", *LAYERWISE, *LOW_BIT],
        "galore_adamw, 8-bit moments, int8 projectors, layer-wise",
    ),
    "adamw_layerwise": (["optimizer.name=adamw", *LAYERWISE], "optax.adamw, layer-wise"),
    # 4 micro-batches: summed in GaLore's subspace (the default where exact; forced
    # here, as the configs clip) or at full size.
    "galore_accum4": (
        ["optimizer.name=galore", "grad_accum_steps=4", "optimizer.full_size_gradients=false"],
        "galore_adamw, 4 micro-batches summed in the subspace",
    ),
    "galore_accum4_one_part": (
        [
            "optimizer.name=galore",
            "grad_accum_steps=4",
            "optimizer.full_size_gradients=false",
            "optimizer.refresh_parts=1",
        ],
        "galore_adamw, 4 micro-batches summed in the subspace, refresh in 1 part",
    ),
    "galore_subspace": (
        ["optimizer.name=galore", "optimizer.full_size_gradients=false"],
        "galore_adamw, data-parallel replicas average low-rank gradients",
    ),
    "galore_layerwise_accum4": (
        ["optimizer.name=galore", *LAYERWISE, "grad_accum_steps=4"],
        "galore_adamw, layer-wise, 4 micro-batches summed in the subspace",
    ),
    "galore_accum4_full_size": (
        ["optimizer.name=galore", "grad_accum_steps=4", "optimizer.full_size_gradients=true"],
        "galore_adamw, 4 micro-batches summed at full size",
    ),
}
DEFAULT_VARIANTS = ("adamw", "galore", "galore_layerwise", "galore_8bit", "galore_layerwise_8bit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_shared_args(p, "--config", "--batch-size", "--seq-len", "--gap", "--rank")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    common.add_overrides_arg(p, help="config override for every variant (repeatable)")
    p.add_argument(
        "--run-steps",
        type=int,
        default=0,
        help="also run this many real steps per variant and report peak_bytes_in_use "
        "(GPU/TPU; 0: compile only)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="CPU devices each compile sees (XLA's host device count; default: the backend's)",
    )
    p.add_argument(
        "--collectives",
        action="store_true",
        help="print the table of bytes through collectives per step (from the compiled HLO)",
    )
    p.add_argument("--json", dest="out", default="", help="JSON results path ('' to skip)")
    common.add_shared_args(p, "--timeout")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--windows", type=int, default=1, help=argparse.SUPPRESS)  # child_argv's
    return p.parse_args(argv)


def _nbytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _live_gradient_bytes(run) -> int:
    """The gradient alive at once: the whole tree, or (layer-wise) its largest group."""
    params = run.abstract_params
    if not run.layerwise:
        return _nbytes(params)
    model = run.scanned_model
    import galore_jax as gj

    one_layer = gj.scanned.one_layer_view(model, params)[model.layers_key]
    return max(_nbytes(one_layer), *(_nbytes(params[k]) for k in (*model.before, *model.after)))


def _activation_bytes(config) -> int:
    """What a rematerialised step keeps: each layer's input, and the f32 logits."""
    import numpy as np

    m = config.model
    tokens = config.batch_size // config.grad_accum_steps * config.seq_len
    itemsize = np.dtype(m.dtype).itemsize
    return m.num_layers * tokens * m.hidden_size * itemsize + tokens * (m.vocab_size or 0) * 4


def compiled_step_memory(config, num_devices: int, run_steps: int = 0) -> dict:
    """Compiles train.py's step for `config` on `num_devices` devices (abstract inputs,
    nothing allocated) and returns XLA's memory analysis beside byte counts from shapes.
    With `run_steps`, also runs that many real steps and reads the device's peak."""
    import jax

    import galore_jax as gj
    from training import mesh as mesh_lib
    from training import steps

    run = steps.build_run(config, num_devices)
    with mesh_lib.use_mesh(run.mesh):
        train_step = steps.make_train_step(run)
        batches = steps.next_train_batches(run)
        abstract = lambda tree, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )
        compiled = train_step.lower(
            abstract(run.abstract_params, run.param_shardings),
            abstract(run.abstract_opt_state, run.opt_shardings),
            jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batches
            ),
        ).compile()
        mem = compiled.memory_analysis()
        moved = _collectives.collective_bytes(compiled.as_text())
        result = {
            "collectives": moved._asdict(),
            "update_proj_gap": run.config.optimizer.update_proj_gap,
            "arguments_bytes": int(mem.argument_size_in_bytes),
            "outputs_bytes": int(mem.output_size_in_bytes),
            "aliased_bytes": int(mem.alias_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "params_bytes": _nbytes(run.abstract_params),
            "opt_state_bytes": int(gj.memory.optimizer_state_bytes(run.abstract_opt_state)),
            "gradient_bytes": _live_gradient_bytes(run),
            "activation_bytes": _activation_bytes(run.config),
            "param_dtype": run.config.model.param_dtype,
            "device": common.jax_device_info(),
            "devices": num_devices,
        }
        result["peak_bytes"] = (
            result["arguments_bytes"]
            + result["outputs_bytes"]
            - result["aliased_bytes"]
            + result["temp_bytes"]
        )
        result["peak_bytes_in_use"] = None
        if run_steps:
            params, opt_state, _ = steps.init_or_restore(run, None)
            for _ in range(run_steps):
                params, opt_state, metrics = compiled(params, opt_state, batches)
            jax.block_until_ready(metrics)
            result["peak_bytes_in_use"] = common.jax_peak_memory_bytes()
            result["loss"] = float(metrics["loss"])
    return result


def run_child(name: str, args) -> dict:
    import jax

    from tasks.registry import load_config

    overrides, description = VARIANTS[name]
    config = load_config(args.config, common.base_overrides(args) + overrides)
    result = {"variant": name, "description": description}
    result.update(compiled_step_memory(config, jax.device_count(), args.run_steps))
    return result


def table(results) -> str:
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"
    base = next((r["peak_bytes"] for r in results if r["variant"] == "adamw"), None)
    rows = [
        [
            r["variant"],
            r["description"],
            gib(r["peak_bytes"]),
            f"{r['peak_bytes'] / base:.2f}x" if base else "-",
            gib(r["params_bytes"]),
            gib(r["opt_state_bytes"]),
            gib(r["gradient_bytes"]),
            gib(r["activation_bytes"]),
            gib(r["peak_bytes"] - r["params_bytes"] - r["opt_state_bytes"]),
            gib(r["arguments_bytes"]),
            gib(r["outputs_bytes"]),
            gib(r["aliased_bytes"]),
            gib(r["temp_bytes"]),
            gib(r["peak_bytes_in_use"]),
        ]
        for r in results
    ]
    headers = [
        "variant",
        "what",
        "peak GiB",
        "vs adamw",
        "params",
        "opt state",
        "live grads",
        "activations",
        "peak - params - state",
        "arguments",
        "outputs",
        "aliased",
        "temporaries",
        "peak_bytes_in_use",
    ]
    return common.markdown_table(headers, rows)


def collectives_table(results) -> str:
    """All-reduced (and other collective) bytes of a steady and a refresh step, amortized."""
    mib = lambda b: f"{b / 2**20:,.2f}"
    base = next((r for r in results if r["variant"] == "adamw"), None)

    def per_step(r):
        c, gap = r["collectives"], r["update_proj_gap"]
        steady, refresh = sum(c["steady"].values()), sum(c["refresh"].values())
        return steady, refresh, (steady * (gap - 1) + refresh) / gap

    rows = []
    for r in results:
        steady, refresh, amortized = per_step(r)
        b_steady, _, b_amortized = per_step(base) if base else (None, None, None)
        kinds = ", ".join(f"{k} {mib(v)}" for k, v in sorted(r["collectives"]["steady"].items()))
        rows.append(
            [
                r["variant"],
                mib(steady),
                f"{steady / b_steady:.3f}x" if b_steady else "-",
                mib(refresh),
                f"{amortized / b_amortized:.3f}x (gap {r['update_proj_gap']})"
                if b_amortized
                else "-",
                kinds or "none",
                r["collectives"]["loops_without_trip_count"],
            ]
        )
    headers = [
        "variant",
        "steady step MiB",
        "vs adamw",
        "refresh step MiB",
        "amortized vs adamw",
        "steady step by kind (MiB)",
        "loops w/o trip count",
    ]
    return common.markdown_table(headers, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        common.print_child_result(run_child(args.child, args))
        return 0
    if args.devices:  # read by the children's JAX at start-up
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    child_args = common.child_argv(args, ["batch_size", "seq_len", "gap", "rank", "run_steps"])
    results = []
    for name in args.variants:
        result = common.run_child(__file__, [name, *child_args], label=name, timeout=args.timeout)
        if result is not None:
            results.append(result)
            print(f"{name}: peak {result['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    if not results:
        return 1
    first = results[0]
    print(
        f"\nCompiled train step of {args.config} ({first['device']['device_kind']}, params "
        f"{first['param_dtype']}, overrides: {' '.join(common.base_overrides(args)) or 'none'}). "
        "GiB = 2^30 bytes; peak = arguments + outputs - aliased + temporaries (XLA memory "
        "analysis, nothing allocated); params / opt state / live grads / activations "
        "counted from shapes.\n"
    )
    print(table(results))
    if args.collectives:
        print(f"\nBytes through collectives per step, per device, on {first['devices']} devices:\n")
        print(collectives_table(results))
    common.print_json_block(results)
    common.write_json(args.out or None, common.payload("memory", results=results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What bounds the optimizer update: XLA's static cost, roofline floors and solver calls.

For one model config and a list of optimizers (built as ``train.py`` builds
them, like ``train_step.py``), compiles the optimizer update alone
(``tx.update``, the same call as train_step.py's "update alone" column) from
abstract shapes, so nothing is allocated and any model size compiles on a CPU.
Two phases per optimizer, each with the step count baked in as a constant so
XLA drops the refresh branch that does not run:

  steady   a step between refreshes (count 1)
  refresh  a step that refreshes every projector (count = gap: warm-started
           randomized or exact SVD; with stagger only the leaves at offset 0)

For each phase it reports, from the compiled executable:

  GFLOP        ``cost_analysis()["flops"]`` (dots and elementwise; solver
               custom calls count 0, see the solver columns)
  GB in+out    argument + output bytes (``memory_analysis()``): what any
               implementation must read and write at least once
  GB HLO       ``cost_analysis()["bytes accessed"]``, summed over the HLO ops
               after this backend's fusion (more passes than in+out)
  floors       compute: GFLOP / peak matmul rate (TF32 for f32 dots, XLA:GPU's
               default precision; bf16 rate otherwise); memory: GB in+out / HBM
               bandwidth. A kernel-perfect update takes max(compute, memory).
  solver calls cholesky / triangular_solve / eigh / qr / svd custom calls with
               their operand shapes: matrix-size factorizations that neither
               roofline sees. On GPU, XLA runs a batched eigh of matrices larger
               than 32 x 32 one matrix at a time (cuSOLVER syevd).

With ``--time-solvers`` each distinct solver call is timed alone on this
machine's device (median of ``--reps``), which gives a "solver s" column:
the phase's solver calls at that speed, and each eigh call is also timed with
``EighImplementation.JACOBI`` (cuSOLVER syevj; GPU only) in a second table.
With ``--measured`` (a train_step.py
JSON) the measured update-alone and refresh-extra times are put next to the
floors: steady measured = ``update_alone_s``; refresh extra measured =
``refresh_step_s - median_step_s``, set against the refresh phase's cost minus
the steady phase's.

With ``--whole-step`` the whole train step (forward, backward and update, as
``train.py`` compiles it; layer-wise for ``*_layerwise``, at ``--batch-size`` x
``--seq-len``) is compiled too, between refreshes, and a second table gives its
full-size passes per projected leaf (per layer slice for a layer-wise step: its
refresh branch is left out by structure), GFLOP and GB HLO. These are static
counts: a scanned layer's body is counted once.

The device whose peaks are used is ``--device`` (default h100; the
numbers are data-sheet peaks for the SXM parts), independent of where the
script runs: the cost analysis is of this backend's compiled program, so run it
on the GPU for GPU fusion, or on a CPU for the counts (FLOPs, in+out bytes and
solver calls do not depend on the backend).

    python benchmarks/update_cost.py --config configs/llama_1b.yaml \\
        --set model.vocab_size=32000 --gap 200 --optimizers adamw galore \\
        --measured benchmarks/results/h100/step_1b.json
    python benchmarks/update_cost.py --config configs/llama_tiny.yaml --gap 10 --time-solvers
    python benchmarks/update_cost.py --config configs/llama_1b.yaml --gap 200 \
        --set model.vocab_size=32000 --batch-size 8 --seq-len 256 \
        --optimizers adamw galore galore_layerwise --whole-step
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter

import _common as common
import train_step

# Data-sheet dense peaks (TFLOP/s) and HBM bandwidth (GB/s), SXM parts.
DEVICE_PEAKS = {
    "h100": {"bf16_tflops": 989.4, "tf32_tflops": 494.7, "hbm_gbs": 3350.0},
    "h200": {"bf16_tflops": 989.4, "tf32_tflops": 494.7, "hbm_gbs": 4800.0},
    "a100": {"bf16_tflops": 312.0, "tf32_tflops": 156.0, "hbm_gbs": 2039.0},
}
SOLVER_KINDS = (  # (kind, substrings of the custom-call target or HLO opcode)
    ("cholesky", ("potrf", "cholesky")),
    ("triangular_solve", ("trsm", "triangular")),
    ("eigh", ("syev", "heev", "eigh")),
    ("qr", ("geqrf", "orgqr", "ungqr", "householder")),
    ("svd", ("gesdd", "gesvd", "svd")),
)
_INSTRUCTION = re.compile(
    r"=\s*\(?\s*(?P<dtype>[a-z]+\d*)\[(?P<shape>[\d,]*)\][^=]*?\s"
    r"(?P<op>custom-call|cholesky|triangular-solve)\("
)
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
HLO_DTYPES = {
    "f16": "float16",
    "bf16": "bfloat16",
    "f32": "float32",
    "f64": "float64",
    "c64": "complex64",
    "c128": "complex128",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_shared_args(p, "--config")
    train_step.add_optimizers_arg(p, ("adamw", "galore", "galore_exact", "tensor_galore"))
    common.add_shared_args(p, "--gap", "--rank", "--tensor-rank")
    common.add_overrides_arg(p)
    p.add_argument(
        "--device", choices=sorted(DEVICE_PEAKS), default="h100", help="whose peaks give the floors"
    )
    p.add_argument(
        "--time-solvers",
        action="store_true",
        help="time each distinct solver call alone on this machine's device",
    )
    p.add_argument("--reps", type=int, default=3, help="timed calls per solver call")
    p.add_argument("--measured", help="train_step.py JSON to put measured times beside the floors")
    p.add_argument(
        "--whole-step",
        action="store_true",
        help="also compile the whole train step (forward, backward and update; layer-wise "
        "for *_layerwise) and count its full-size passes per projected (layer) leaf",
    )
    common.add_shared_args(p, "--batch-size", "--seq-len")
    common.add_out_arg(p, "update_cost")
    args = p.parse_args(argv)
    args.accum = None  # train_step.build reads it: one micro-batch with --batch-size
    return args


def with_constant_count(state, count: int):
    """The state with every int32 `count` (GaLore's, Adam's, schedules'; a layer-wise
    state's are stacked per layer) set to a trace-time constant, so XLA folds the
    refresh switch to the branch that runs."""
    import jax
    import jax.numpy as jnp

    def fix(path, leaf):
        name = getattr(path[-1], "name", None) if path else None
        if name == "count" and leaf.dtype == jnp.int32:
            return jnp.full(leaf.shape, count, jnp.int32)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, state)


def solver_calls(hlo_text: str) -> Counter:
    """Counter of (kind, dtype, shape) over the solver ops of an optimized HLO module."""
    calls = Counter()
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        target = _TARGET.search(line)
        name = (target.group("target") if target else match.group("op")).lower()
        for kind, keys in SOLVER_KINDS:
            if any(k in name for k in keys):
                calls[(kind, match.group("dtype"), match.group("shape"))] += 1
                break
    return calls


_HLO_LINE = re.compile(
    r"^\s+(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<type>[a-z]+\d*\[[\d,]*\]\S*) "
    r"(?P<op>[\w\-]+)\((?P<args>[^)]*)\)"
)
_CALLED = re.compile(r"(?:calls|to_apply)=%(?P<name>[\w.\-]+)")
_NOT_A_PASS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-start"}


_SUBCOMPUTATION = re.compile(r"(?:calls|to_apply|body|condition)=%(?P<name>[\w.\-]+)")


def _outside_branches(hlo_text: str) -> set:
    """Computations reachable from ENTRY without entering a `conditional`'s branch."""
    edges, entry, computation = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?P<entry>ENTRY\s+)?%(?P<name>[\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            computation = header.group("name")
            entry = computation if header.group("entry") else entry
            edges[computation] = set()
        elif computation is not None:
            edges[computation].update(_SUBCOMPUTATION.findall(line))
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen or name not in edges:
            continue
        seen.add(name)
        todo.extend(edges[name])
    return seen


def full_size_passes(hlo_text: str, leaf_sizes: list, *, branches: bool = True) -> float:
    """Ops of the compiled update that read or write an array of a projected leaf's
    full size, per projected leaf (a kernel = one top-level op; fused bodies are inside it).

    An op touching arrays of two full sizes counts once for each; ops are matched by
    element count (XLA:CPU may reshape a stacked (L, m, n) leaf into 2-D), so leaves
    of one size share that size's count. With `branches=False` the ops inside a
    `conditional`'s branches (a refresh that runs or not at run time) are left out, and
    so are the `while` / `conditional` ops themselves (they pass buffers, no kernel).
    """
    fused = set(_CALLED.findall(hlo_text))
    counted = None if branches else _outside_branches(hlo_text)
    sizes = {}  # instruction name -> element count, per computation
    counts = Counter()
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            computation, sizes = header.group("name"), {}
            continue
        match = _HLO_LINE.match(line)
        if not match or (counted is not None and computation not in counted):
            continue
        if counted is not None and match.group("op") in ("while", "conditional", "call"):
            continue
        dims = re.match(r"[a-z]+\d*\[(?P<dims>[\d,]*)\]", match.group("type")).group("dims")
        size = math.prod(int(d) for d in dims.split(",") if d)
        sizes[match.group("name")] = size
        if computation in fused or match.group("op") in _NOT_A_PASS:
            continue
        touched = {size} | {sizes.get(a) for a in re.findall(r"%([\w.\-]+)", match.group("args"))}
        for s in touched & set(leaf_sizes):
            counts[s] += 1
    per_size = Counter(leaf_sizes)
    return sum(counts[s] for s in per_size) / max(len(leaf_sizes), 1)


def matmul_peak_tflops(params, peaks: dict) -> float:
    """TF32 rate if any param is f32 (XLA:GPU's default precision for f32 dots), else bf16."""
    import jax
    import jax.numpy as jnp

    dtypes = {x.dtype for x in jax.tree.leaves(params)}
    return peaks["tf32_tflops"] if jnp.dtype(jnp.float32) in dtypes else peaks["bf16_tflops"]


def whole_step_cost(run) -> dict:
    """The compiled train step between refreshes (count 1, as the steady phase): full-size
    passes per projected leaf (per layer slice of one for a layer-wise step, which
    updates a layer at a time), FLOPs and HLO bytes."""
    import jax

    from training import steps

    sizes = projected_leaf_sizes(run, per_layer=run.layerwise)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), steps.next_train_batches(run)
    )
    train_step = steps.make_train_step(run, donate=False)
    step = jax.jit(lambda p, s, b: train_step(p, with_constant_count(s, 1), b))
    compiled = step.lower(run.abstract_params, run.abstract_opt_state, batch).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return {
        # A layer-wise step's counts are loop-carried (no constant): leave its refresh
        # branch out by structure.
        "full_size_passes_per_leaf": full_size_passes(compiled.as_text(), sizes, branches=False),
        "flops": float(cost.get("flops", 0.0)),
        "hlo_bytes": float(cost.get("bytes accessed", 0.0)),
    }


def phase_cost(tx, abstract_params, count: int, leaf_sizes: list) -> dict:
    import jax

    abstract_state = jax.eval_shape(tx.init, abstract_params)

    def update(grads, state, params):
        return tx.update(grads, with_constant_count(state, count), params)

    compiled = jax.jit(update).lower(abstract_params, abstract_state, abstract_params).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    calls = solver_calls(hlo)
    return {
        "full_size_passes_per_leaf": full_size_passes(hlo, leaf_sizes),
        "count": count,
        "flops": float(cost.get("flops", 0.0)),
        "hlo_bytes": float(cost.get("bytes accessed", 0.0)),
        "in_out_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "solver_calls": [
            {"kind": k, "dtype": d, "shape": [int(s) for s in shape.split(",") if s], "calls": n}
            for (k, d, shape), n in sorted(calls.items())
        ],
    }


def projected_leaf_sizes(run, *, per_layer: bool = False) -> list:
    """Element counts of the leaves GaLore projects (the same leaves for every optimizer);
    with `per_layer`, one layer's slice of each stacked layer leaf (what a layer-wise
    step updates at a time)."""
    import jax

    import galore_jax as gj

    labels = gj.galore_labels(
        run.abstract_params,
        dimension_numbers=run.dimension_numbers,
        label_overrides=run.config.optimizer.label_overrides,
    )
    layers_key = run.scanned_model.layers_key if per_layer else None
    leaves = jax.tree_util.tree_flatten_with_path(run.abstract_params)[0]
    return [
        math.prod(x.shape[1:] if getattr(path[0], "key", None) == layers_key else x.shape)
        for (path, x), label in zip(leaves, jax.tree.leaves(labels))
        if label == "galore"
    ]


def time_solver(
    kind: str, dtype: str, shape: list, reps: int, eigh_implementation: str | None = None
) -> float:
    """Median seconds of one solver call of this kind and operand shape on device 0
    (eigh: `jax.lax.linalg.EighImplementation` named by `eigh_implementation`, None:
    the backend's default)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), shape, HLO_DTYPES[dtype])
    if kind in ("cholesky", "triangular_solve", "eigh"):
        n = shape[-1]
        spd = jax.jit(
            lambda x: x @ jnp.conj(jnp.swapaxes(x, -1, -2)) / n + jnp.eye(n, dtype=x.dtype)
        )(x)
        if kind == "cholesky":
            fn, arg = jax.jit(jnp.linalg.cholesky), spd
        elif kind == "eigh" and eigh_implementation is not None:
            implementation = jax.lax.linalg.EighImplementation(eigh_implementation)
            fn = jax.jit(lambda a: jax.lax.linalg.eigh(a, implementation=implementation))
            arg = spd
        elif kind == "eigh":
            fn, arg = jax.jit(lambda a: jnp.linalg.eigh(a)), spd
        else:
            lower = jax.jit(jnp.linalg.cholesky)(spd)
            eye = jnp.broadcast_to(jnp.eye(n, dtype=lower.dtype), lower.shape)
            fn = jax.jit(lambda low: jax.scipy.linalg.solve_triangular(low, eye, lower=True))
            arg = lower
    elif kind == "qr":
        fn, arg = jax.jit(lambda a: jnp.linalg.qr(a)), x
    else:  # svd: the operand of a gesdd/gesvd call is the matrix itself
        fn, arg = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False)), x
    timing = common.time_calls(lambda: fn(arg), reps=reps, sync=jax.block_until_ready)
    return timing["median_s"]


def time_eigh_implementations(solver_seconds: dict, reps: int) -> list:
    """Each eigh call of the refreshes, timed with the default (cuSOLVER syevd beyond
    32 x 32) and with Jacobi (syevj): where Jacobi wins. Jacobi is GPU/TPU only."""
    rows = []
    for (kind, dtype, shape), default_s in solver_seconds.items():
        if kind != "eigh":
            continue
        row = {"dtype": dtype, "shape": list(shape), "default_s": default_s}
        try:
            row["jacobi_s"] = time_solver(kind, dtype, list(shape), reps, "jacobi")
        except Exception as e:  # noqa: BLE001 - e.g. XLA:CPU has none: say so in the table
            row["jacobi"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        rows.append(row)
    return rows


def load_measured(path):
    if not path:
        return {}
    with open(path) as f:
        payload = json.load(f)
    out = {}
    for r in payload["results"]:
        steady = r.get("update_alone_s")
        refresh = r.get("refresh_step_s")
        extra = refresh - r["median_step_s"] if refresh is not None else None
        out[r["optimizer"]] = {"steady": steady, "refresh": extra}
    return out


def call_key(call: dict) -> tuple:
    return call["kind"], call["dtype"], tuple(call["shape"])


def describe_calls(calls: list) -> str:
    if not calls:
        return "none"
    return ", ".join(
        f"{c['calls']}x {c['kind']} {c['dtype']}[{','.join(map(str, c['shape']))}]" for c in calls
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    peaks = DEVICE_PEAKS[args.device]
    solver_seconds = {}
    rows = []
    for name in args.optimizers:
        run = train_step.build(name, args)
        opt_cfg, abstract_params, tx = run.config.optimizer, run.abstract_params, run.tx
        matmul_tflops = matmul_peak_tflops(abstract_params, peaks)
        gap = opt_cfg.update_proj_gap
        sizes = projected_leaf_sizes(run)
        phases = {"steady": phase_cost(tx, abstract_params, 1, sizes)}
        if not name.startswith("adamw"):
            phases["refresh"] = phase_cost(tx, abstract_params, gap, sizes)
        for cost in phases.values():
            if args.time_solvers:
                for c in cost["solver_calls"]:
                    key = call_key(c)
                    if key not in solver_seconds:
                        solver_seconds[key] = time_solver(
                            c["kind"], c["dtype"], c["shape"], args.reps
                        )
                        print(
                            f"  {c['kind']} {c['dtype']}{list(c['shape'])}: "
                            f"{solver_seconds[key]:.4f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                cost["solver_s"] = sum(
                    solver_seconds[call_key(c)] * c["calls"] for c in cost["solver_calls"]
                )
            cost["compute_floor_s"] = cost["flops"] / (matmul_tflops * 1e12)
            cost["memory_floor_s"] = cost["in_out_bytes"] / (peaks["hbm_gbs"] * 1e9)
            cost["floor_s"] = max(cost["compute_floor_s"], cost["memory_floor_s"])
        if "refresh" in phases:
            steady, refresh = phases["steady"], phases["refresh"]
            # What the refresh adds to a step (the measured refresh extra is the same difference).
            phases["refresh_extra"] = {
                "flops": refresh["flops"] - steady["flops"],
                "compute_floor_s": refresh["compute_floor_s"] - steady["compute_floor_s"],
                "solver_calls": refresh["solver_calls"],
                "full_size_passes_per_leaf": refresh["full_size_passes_per_leaf"]
                - steady["full_size_passes_per_leaf"],
                **(
                    {"solver_s": refresh["solver_s"] - steady.get("solver_s", 0.0)}
                    if "solver_s" in refresh
                    else {}
                ),
            }
        rows.append(
            {
                "optimizer": name,
                "description": train_step.DESCRIPTIONS[name],
                "gap": gap,
                "rank": opt_cfg.rank,
                "matmul_tflops": matmul_tflops,
                "phases": phases,
                **({"whole_step": whole_step_cost(run)} if args.whole_step else {}),
            }
        )
        print(f"{name}: compiled", file=sys.stderr, flush=True)

    measured = load_measured(args.measured)
    dev = jax.devices()[0]
    print(
        f"Optimizer update alone (tx.update) of {args.config} "
        f"({sum(x.size for x in jax.tree.leaves(abstract_params)) / 1e6:.1f}M params, "
        f"rank {rows[0]['rank']}, gap {rows[0]['gap']}), compiled by jax {jax.__version__} for "
        f"{dev.platform} ({dev.device_kind}); floors at {args.device} peaks "
        f"(matmul {rows[0]['matmul_tflops']} TFLOP/s, HBM {peaks['hbm_gbs']:.0f} GB/s)"
        + (f"; solver s timed on {dev.device_kind}" if args.time_solvers else "")
        + (f"; measured: {args.measured}" if args.measured else "")
        + ".\n"
    )
    headers = [
        "optimizer",
        "phase",
        "GFLOP",
        "GB in+out",
        "GB HLO",
        "compute floor ms",
        "memory floor ms",
        "floor ms",
        "full-size passes / leaf",
    ]
    if args.time_solvers:
        headers.append("solver s")
    if measured:
        headers += ["measured ms", "measured / floor"]
    headers.append("solver calls")
    table_rows = []
    for r in rows:
        for phase in ("steady", "refresh_extra"):
            cost = r["phases"].get(phase)
            if cost is None:
                continue
            is_extra = phase == "refresh_extra"
            floor_s = cost["compute_floor_s"] if is_extra else cost["floor_s"]
            row = [
                r["optimizer"],
                "refresh extra" if is_extra else "steady",
                f"{cost['flops'] / 1e9:,.1f}",
                "-" if is_extra else f"{cost['in_out_bytes'] / 1e9:.2f}",
                "-" if is_extra else f"{cost['hlo_bytes'] / 1e9:.2f}",
                f"{cost['compute_floor_s'] * 1e3:.2f}",
                "-" if is_extra else f"{cost['memory_floor_s'] * 1e3:.2f}",
                f"{floor_s * 1e3:.2f}",
                f"{cost['full_size_passes_per_leaf']:+.1f}"
                if is_extra
                else f"{cost['full_size_passes_per_leaf']:.1f}",
            ]
            if args.time_solvers:
                row.append(f"{cost['solver_s']:.3f}")
            if measured:
                m = measured.get(r["optimizer"], {}).get("refresh" if is_extra else "steady")
                row += [
                    "-" if m is None else f"{m * 1e3:.1f}",
                    "-" if m is None or floor_s <= 0 else f"{m / floor_s:.1f}x",
                ]
            row.append(describe_calls(cost["solver_calls"]))
            table_rows.append(row)
    print(common.markdown_table(headers, table_rows))
    if args.whole_step:
        print(
            "\nWhole train step between refreshes: full-size passes per projected leaf (a "
            "layer-wise step: per layer slice), compiled for this backend; static counts "
            "(a scanned layer's body once).\n"
        )
        print(
            common.markdown_table(
                ["optimizer", "full-size passes / leaf", "GFLOP", "GB HLO"],
                [
                    [
                        r["optimizer"],
                        f"{r['whole_step']['full_size_passes_per_leaf']:.1f}",
                        f"{r['whole_step']['flops'] / 1e9:,.1f}",
                        f"{r['whole_step']['hlo_bytes'] / 1e9:.2f}",
                    ]
                    for r in rows
                ],
            )
        )
    eigh_rows = time_eigh_implementations(solver_seconds, args.reps) if args.time_solvers else []
    if eigh_rows:
        print(f"\neigh per call on {dev.device_kind}: default vs Jacobi (seconds, median).\n")
        print(
            common.markdown_table(
                ["operand", "default s", "jacobi s", "jacobi / default"],
                [
                    [
                        f"{r['dtype']}[{','.join(map(str, r['shape']))}]",
                        f"{r['default_s']:.4f}",
                        f"{r['jacobi_s']:.4f}" if "jacobi_s" in r else r["jacobi"],
                        f"{r['jacobi_s'] / r['default_s']:.2f}x" if "jacobi_s" in r else "-",
                    ]
                    for r in eigh_rows
                ],
            )
        )
    common.print_json_block(rows)
    common.write_json(
        args.out,
        common.payload(
            "update_cost",
            device=common.jax_device_info(),
            peaks=peaks,
            results=rows,
            eigh_implementations=eigh_rows,
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

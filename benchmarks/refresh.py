"""Whole-model GaLore subspace refresh: exact vs randomized vs warm-started randomized.

Builds the matrix gradients of a LLaMA-shaped model as stacked-layer leaves
``(L, m, n)`` (q, k, v, o: d x d; gate, up: d x f; down: f x d), refreshes the
projectors of all of them at once, and times, for each SVD method:

* **refresh only**: the new projectors of every leaf, their factorisations
  shared (what ``galore_jax._matrix_plan.refresh_projectors`` computes
  inside the optimizer), one jitted call;
* **update w/ refresh**: one ``scale_by_galore`` update at a refresh step
  (refresh + projection + Adam + projection back), the step that spikes;
* **update w/o refresh**: the same jitted update at a step between refreshes.

"randomized" starts the range finder from a Gaussian sketch, "randomized warm"
from the previous basis (the library default after the first refresh).
Every time is the median of ``--reps`` calls after a warm-up call (compile),
with ``jax.block_until_ready``.

Accuracy: the gradients are synthetic with a realistic decaying spectrum, a
rank-``signal_rank`` part with singular values ``(i+1)^-decay`` plus Gaussian
noise whose top singular value is ``noise`` times the r-th signal value (random
Gaussian matrices have no spectral gap, so their top-r subspace means nothing).
The previous basis for the warm start comes from an earlier gradient whose
signal factors differ by ``drift``. On a few matrices (layer 0 of some leaves)
the script reports the largest principal-angle sine between each method's basis
and the exact SVD's, and the fraction of the exact basis's captured gradient
energy ``||P^T G||_F^2 / ||P_exact^T G||_F^2`` that the method captures.

    python benchmarks/refresh.py --shape small                 # CPU, ~1 minute
    python benchmarks/refresh.py --shape 1b --out refresh_1b.json   # GPU
    python benchmarks/refresh.py --shape 7b                     # GPU, bf16 grads
    python benchmarks/refresh.py --shape small --layers 2 --rank 32 --optax-contrib
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import _common as common  # noqa: F401  (puts the repo on sys.path)

PRESETS = {
    # CPU-sized: a few seconds per method on 2 cores.
    "small": dict(layers=4, hidden=256, intermediate=688, rank=64, dtype="float32"),
    # GaLore paper shapes (Zhao et al. 2024, Table 5 / 11).
    "1b": dict(layers=24, hidden=2048, intermediate=5461, rank=512, dtype="float32"),
    # f32 7B gradients alone are 26 GB (and the update another 26 GB): bf16 by default.
    "7b": dict(layers=32, hidden=4096, intermediate=11008, rank=1024, dtype="bfloat16"),
}
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("exact", "randomized", "randomized_warm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(PRESETS), default="small")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--hidden", type=int, help="override d (q/k/v/o are d x d)")
    p.add_argument("--intermediate", type=int, help="override f (gate/up d x f, down f x d)")
    p.add_argument("--rank", type=int, help="override the GaLore rank")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="gradient / param dtype")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--proj-type", default="std")
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--power-iters", type=int, default=1)
    p.add_argument(
        "--intermediate-passes",
        type=int,
        choices=(1, 2),
        default=2,
        help="Cholesky-QR passes for the range finder's blocks between products",
    )
    p.add_argument(
        "--eigh-implementation",
        choices=("qr", "jacobi"),
        help="the randomized refresh's Rayleigh-Ritz eigh (default: the backend's; "
        "jacobi: cuSOLVER syevj, GPU only)",
    )
    p.add_argument(
        "--gap",
        type=int,
        default=200,
        help="update_proj_gap, for the amortized 'extra per step' column",
    )
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement")
    p.add_argument(
        "--exact-reps",
        type=int,
        help="timed calls for the exact method (default: --reps); at 1B one exact "
        "whole-model refresh takes tens of seconds on a GPU",
    )
    p.add_argument(
        "--exact-refresh-only",
        action="store_true",
        help="time the exact method's refresh only, not its update at a refresh "
        "step (that is refresh + the update between refreshes)",
    )
    p.add_argument(
        "--signal-rank",
        type=int,
        help="rank of the gradients' signal part (default: the GaLore rank)",
    )
    p.add_argument("--decay", type=float, default=1.0, help="signal singular values (i+1)^-decay")
    p.add_argument(
        "--noise",
        type=float,
        default=0.5,
        help="noise top singular value / r-th signal singular value",
    )
    p.add_argument(
        "--drift",
        type=float,
        default=0.3,
        help="relative change of the signal factors between the previous "
        "gradient (warm-start basis) and the current one",
    )
    p.add_argument(
        "--accuracy-leaves",
        nargs="*",
        default=["q_proj", "gate_proj", "down_proj"],
        choices=LEAVES,
        help="leaves whose layer 0 is checked against the exact SVD",
    )
    p.add_argument(
        "--optax-contrib",
        action="store_true",
        help="also time optax.contrib.scale_by_galore (exact SVD, one 2-D leaf per "
        "layer and matrix, lax.cond) on the same gradients",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=4,
        help="also refresh (warm) from this many micro-batch gradients summed in passes "
        "(gj.accumulate_in_subspace); 0: skip",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the full results (all timings) as JSON here")
    args = p.parse_args(argv)
    preset = PRESETS[args.shape]
    for key in ("layers", "hidden", "intermediate", "rank", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.signal_rank is None:
        args.signal_rank = args.rank
    return args


def leaf_shapes(layers: int, d: int, f: int) -> dict:
    return {
        "q_proj": (layers, d, d),
        "k_proj": (layers, d, d),
        "v_proj": (layers, d, d),
        "o_proj": (layers, d, d),
        "gate_proj": (layers, d, f),
        "up_proj": (layers, d, f),
        "down_proj": (layers, f, d),
    }


def make_gradient_fn(shape, args, dtype):
    """jitted (key, drift) -> synthetic (L, m, n) gradient with a decaying spectrum."""
    import jax
    import jax.numpy as jnp

    import galore_jax as gj

    layers, m, n = shape
    k = min(args.signal_rank, m, n)
    s = (1.0 + jnp.arange(k, dtype=jnp.float32)) ** -args.decay
    s_r = float(min(args.rank, k)) ** -args.decay  # the r-th signal singular value
    sigma = args.noise * s_r / (math.sqrt(m) + math.sqrt(n))

    @jax.jit
    def gradient(key, drift):
        # The signal factors come from `key` alone; `drift` moves them along a
        # fixed random direction and the noise is drawn fresh for each call.
        ka, kb, kda, kdb, kn = jax.random.split(key, 5)
        a = jax.random.normal(ka, (layers, m, k)) + drift * jax.random.normal(kda, (layers, m, k))
        b = jax.random.normal(kb, (layers, n, k)) + drift * jax.random.normal(kdb, (layers, n, k))
        qa, qb = gj.linalg.orthonormalize(a), gj.linalg.orthonormalize(b)
        signal = jnp.einsum("lmk,k,lnk->lmn", qa, s, qb)
        noise_key = jax.random.fold_in(kn, jnp.asarray(drift * 1e6, jnp.int32))
        return (signal + sigma * jax.random.normal(noise_key, (layers, m, n))).astype(dtype)

    return gradient


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import galore_jax as gj
    from galore_jax import _matrix_plan as proj

    dtype = jnp.dtype(args.dtype)
    shapes = leaf_shapes(args.layers, args.hidden, args.intermediate)
    dims = gj.DimensionNumbers(batch_axes=(0,))
    plans = {
        name: proj.matrix_plan(shape, dims, args.proj_type, args.rank, name)
        for name, shape in shapes.items()
    }
    info = common.jax_device_info()
    num_matrices = args.layers * len(shapes)
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    say(f"device: {info['device_kind']} ({info['platform']}), jax {info['jax']}")
    say(
        f"{num_matrices} matrices ({args.layers} layers x 7; d={args.hidden}, "
        f"f={args.intermediate}), rank {args.rank}, {args.dtype}"
    )

    # ---- Gradients: a "previous" one (gives the warm-start basis) and the current one.
    key = jax.random.PRNGKey(args.seed)
    gen = {name: make_gradient_fn(shape, args, dtype) for name, shape in shapes.items()}
    leaf_keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(LEAVES)}

    def gradients(drift):
        return {name: gen[name](leaf_keys[name], jnp.float32(drift)) for name in LEAVES}

    randomized = gj.RandomizedSVD(
        oversample=args.oversample,
        power_iters=args.power_iters,
        passes=args.intermediate_passes,
        eigh=args.eigh_implementation,
        seed=args.seed,
    )

    def refresh_all(grads, old, refresh_key, *, svd, warm):
        """Every leaf's projectors in one refresh, their factorisations shared (as the
        optimizer refreshes leaves due at one step)."""
        news = proj.refresh_projectors(
            [plans[name] for name in LEAVES],
            [plans[name].to_standard(grads[name]) for name in LEAVES],
            [old[name] for name in LEAVES],
            refresh=randomized if svd == "randomized" else gj.ExactSVD(seed=args.seed),
            keys=[jax.random.fold_in(refresh_key, i) for i in range(len(LEAVES))],
            warm=warm,
        )
        return dict(zip(LEAVES, news))

    jit_refresh = {
        "exact": jax.jit(lambda g, o, k: refresh_all(g, o, k, svd="exact", warm=False)),
        "randomized": jax.jit(lambda g, o, k: refresh_all(g, o, k, svd="randomized", warm=False)),
        "randomized_warm": jax.jit(
            lambda g, o, k: refresh_all(g, o, k, svd="randomized", warm=True)
        ),
    }
    zeros = {name: proj.init_projectors(plans[name], dtype) for name in LEAVES}
    start = time.perf_counter()
    previous = gradients(0.0)
    jax.block_until_ready(previous)
    previous_basis = jit_refresh["randomized"](previous, zeros, jax.random.PRNGKey(1))
    jax.block_until_ready(previous_basis)
    del previous
    grads = gradients(args.drift)
    jax.block_until_ready(grads)
    say(
        f"synthetic gradients: {time.perf_counter() - start:.1f} s "
        f"({sum(g.nbytes for g in grads.values()) / 2**30:.2f} GiB per gradient set)"
    )

    # ---- Accuracy reference data (layer 0 of a few leaves, on the host).
    def layer0_basis(name, projectors):
        """(dim, r) float64 basis of layer 0 on the projected side, and that side."""
        plan = plans[name]
        p = np.asarray(jax.device_get(projectors[name][0][0]), np.float64)
        return (p, "left") if plan.side == "left" else (p.T, "right")

    g0 = {
        name: np.asarray(jax.device_get(grads[name][0]), np.float64)
        for name in args.accuracy_leaves
    }
    bases = {}

    def keep_bases(method):
        def keep(out):
            bases[method] = {name: layer0_basis(name, out) for name in args.accuracy_leaves}

        return keep

    def state_projectors(per_leaf):
        """Per-leaf projector tuples (refresh_projectors' layout) -> the state's slot trees."""
        sides = {"left": ("left",), "right": ("right",), "full": ("left", "right")}
        slots = {field: {} for field in gj.galore.MatrixProjectors._fields}
        for name, arrays in per_leaf.items():
            filled = dict(zip(sides[plans[name].side], arrays))
            for field, tree in slots.items():
                tree[name] = filled.get(field, ())
        return gj.galore.MatrixProjectors(**slots)

    # ---- Timings.
    results = {}
    refresh_key = jax.random.PRNGKey(2)
    sync = jax.block_until_ready
    methods = list(args.methods)

    def galore_at_a_refresh(svd):
        """scale_by_galore with `svd`, and its state at a (non-first) refresh step with
        the previous refresh's projectors."""
        tx = gj.scale_by_galore(
            args.rank,
            update_proj_gap=args.gap,
            proj_type=args.proj_type,
            svd=svd,
            dimension_numbers=dims,
        )
        state = jax.jit(tx.init)(grads)._replace(projectors=state_projectors(previous_basis))
        return tx, state._replace(count=jnp.asarray(args.gap, jnp.int32))

    def measure(method):
        old = previous_basis if method == "randomized_warm" else zeros
        fn = jit_refresh[method]
        is_exact = method == "exact"
        reps = args.exact_reps if is_exact and args.exact_reps else args.reps
        say(f"{method}: refresh only ...")
        out = {
            "refresh_only": common.time_calls(
                lambda: fn(grads, old, refresh_key),
                reps=reps,
                sync=sync,
                on_first=keep_bases(method),
            )
        }
        svd = (
            gj.ExactSVD(seed=args.seed)
            if is_exact
            else dataclasses.replace(randomized, warm_start=method == "randomized_warm")
        )
        tx, at_refresh = galore_at_a_refresh(svd)
        between = at_refresh._replace(count=jnp.asarray(args.gap + 1, jnp.int32))
        update = jax.jit(tx.update)
        if not (is_exact and args.exact_refresh_only):
            say(f"{method}: update at a refresh step ...")
            out["update_refresh"] = common.time_calls(
                lambda: update(grads, at_refresh), reps=reps, sync=sync
            )
        say(f"{method}: update between refreshes ...")
        out["update_plain"] = common.time_calls(
            lambda: update(grads, between), reps=args.reps, sync=sync
        )
        return out

    def measure_passes():
        """The warm refresh of `optimizer.full_size_gradients=false`: the gradient exists
        only as micro-batch parts (the gradient plus zero-mean noise each) and every
        product of the range finder is one pass over them. Also the full-size update's
        refresh with the same state (same sketches): the two bases should coincide."""
        k = args.micro_batches
        tx, state = galore_at_a_refresh(dataclasses.replace(randomized, warm_start=True))

        def loss(params, batch):  # linear: the gradient is the batch
            return sum(jnp.sum(params[n].astype(jnp.float32) * batch[n]) for n in LEAVES)

        parts = {}
        for i, name in enumerate(LEAVES):
            g = grads[name].astype(jnp.float32)
            noise = jax.random.normal(jax.random.fold_in(key, 100 + i), (k, *g.shape))
            noise = (noise - noise.mean(0)) * jnp.std(g)
            parts[name] = g[None] + noise
        accumulate = jax.jit(gj.accumulate_in_subspace(loss, tx))
        names = gj.paths.leaf_paths(grads)[0]

        def per_leaf(projector_slots):
            return {
                n: tuple(x for x in slots if not (type(x) is tuple and not x))
                for n, slots in zip(names, projector_slots)
            }

        def refresh_from_passes():
            _, _, subspace = accumulate(grads, parts, state)
            (given,) = subspace.entries.values()
            return per_leaf(given.projectors)

        say(f"randomized warm from {k} micro-batch passes: refresh only ...")
        out = {
            "refresh_only": common.time_calls(
                refresh_from_passes,
                reps=args.reps,
                sync=sync,
                on_first=keep_bases("randomized_warm_passes"),
            )
        }
        _, full = jax.jit(tx.update)(grads, state)
        slots = [
            jax.tree.leaves(t, is_leaf=lambda x: type(x) is tuple and not x)
            for t in full.projectors
        ]
        dense = per_leaf([tuple(slot[i] for slot in slots) for i in range(len(names))])
        for name in args.accuracy_leaves:
            p, _ = bases["randomized_warm_passes"][name]
            q, _ = layer0_basis(name, dense)
            out.setdefault("max_sin_angle_vs_full_size", {})[name] = float(
                np.linalg.norm(p - q @ (q.T @ p), 2)
            )
        return out

    def measure_adam():
        # Reference: a full-rank Adam update of the same gradients (what GaLore replaces).
        say("full-rank adam: update ...")
        adam = optax.scale_by_adam()
        adam_state = jax.jit(adam.init)(grads)
        adam_update = jax.jit(adam.update)
        return {
            "update_plain": common.time_calls(
                lambda: adam_update(grads, adam_state), reps=args.reps, sync=sync
            )
        }

    def guarded(fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # e.g. RESOURCE_EXHAUSTED at 7B: report it, go on
            say(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}

    for method in methods:
        results[method] = guarded(measure, method)
    if "exact" not in methods and args.accuracy_leaves:
        say("exact: reference bases ...")
        guarded(lambda: keep_bases("exact")(jit_refresh["exact"](grads, zeros, refresh_key)))
    if args.micro_batches:
        results["randomized_warm_passes"] = guarded(measure_passes)
        methods.append("randomized_warm_passes")
    if args.optax_contrib:
        results["optax_contrib"] = guarded(time_optax_contrib, args, grads, sync, say)
    results["adam"] = guarded(measure_adam)

    # ---- Accuracy against the exact SVD.
    accuracy = {}
    if "exact" in bases:
        for method in methods:
            if method == "exact" or method not in bases:
                continue
            accuracy[method] = {}
            for name in args.accuracy_leaves:
                p, side = bases[method][name]
                q, _ = bases["exact"][name]
                g = g0[name] if side == "left" else g0[name].T
                # sin of the largest principal angle = ||(I - Q Q^T) P||_2 (accurate near 0).
                sin_max = float(np.linalg.norm(p - q @ (q.T @ p), 2))
                energy = float(np.sum((p.T @ g) ** 2) / np.sum((q.T @ g) ** 2))
                accuracy[method][name] = {"max_sin_angle": sin_max, "energy_ratio": energy}

    payload = common.payload(
        "refresh",
        device=info,
        shape={
            "preset": args.shape,
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "rank": args.rank,
            "dtype": args.dtype,
            "num_matrices": num_matrices,
            "leaves": {k: list(v) for k, v in shapes.items()},
            "sides": {k: plans[k].side for k in LEAVES},
        },
        settings={
            k: getattr(args, k)
            for k in (
                "proj_type",
                "oversample",
                "power_iters",
                "intermediate_passes",
                "eigh_implementation",
                "gap",
                "reps",
                "exact_reps",
                "exact_refresh_only",
                "signal_rank",
                "decay",
                "noise",
                "drift",
                "seed",
            )
        },
        results=results,
        accuracy=accuracy,
    )
    print(report(payload))
    summary = json.loads(json.dumps(payload))
    for r in summary["results"].values():
        for t in r.values():
            if isinstance(t, dict):
                t.pop("times_s", None)
    common.print_json_block(summary)
    common.write_json(args.out, payload)
    return 0


def time_optax_contrib(args, grads, sync, say) -> dict:
    """optax.contrib.scale_by_galore (exact SVD in lax.cond) on per-layer 2-D leaves."""
    import jax
    import jax.numpy as jnp
    import optax

    flat = {
        f"{name}_{layer}": grads[name][layer] for name in LEAVES for layer in range(args.layers)
    }
    tx = optax.contrib.scale_by_galore(rank=args.rank, update_proj_gap=args.gap)
    state = jax.jit(tx.init)(flat)
    update = jax.jit(tx.update)
    # Its first update refreshes (count 0); keep those projectors, then time
    # count = gap (refresh) and gap + 1 (no refresh).
    _, state = update(flat, state)
    out = {}
    say("optax.contrib: update at a refresh step ...")
    at_refresh = state._replace(count=jnp.asarray(args.gap, jnp.int32))
    out["update_refresh"] = common.time_calls(
        lambda: update(flat, at_refresh), reps=args.reps, sync=sync
    )
    say("optax.contrib: update between refreshes ...")
    between = state._replace(count=jnp.asarray(args.gap + 1, jnp.int32))
    out["update_plain"] = common.time_calls(
        lambda: update(flat, between), reps=args.reps, sync=sync
    )
    return out


LABELS = {
    "exact": "exact SVD",
    "randomized": "randomized",
    "randomized_warm": "randomized, warm start",
    "randomized_warm_passes": "randomized, warm start, from micro-batch passes",
    "optax_contrib": "optax.contrib.scale_by_galore (exact, per matrix)",
    "adam": "full-rank optax.scale_by_adam (no GaLore)",
}


def report(payload: dict) -> str:
    shape, settings, info = payload["shape"], payload["settings"], payload["device"]
    lines = [
        f"Whole-model refresh on {info['device_kind']} ({info['platform']}, jax {info['jax']}): "
        f"{shape['num_matrices']} matrices = {shape['layers']} layers x 7 "
        f"(d={shape['hidden']}, f={shape['intermediate']}), rank {shape['rank']}, "
        f"{shape['dtype']}, oversample {settings['oversample']}, "
        f"power iters {settings['power_iters']}, "
        f"{settings.get('intermediate_passes', 2)} Cholesky-QR passes between products, "
        f"eigh {settings.get('eigh_implementation') or 'default'}; "
        f"median of {settings['reps']} calls"
        + (f" ({settings['exact_reps']} for exact)" if settings.get("exact_reps") else "")
        + ".",
        "",
    ]
    gap = settings["gap"]
    acc_leaves = sorted(
        {leaf for m in payload["accuracy"].values() for leaf in m}, key=LEAVES.index
    )
    short = "/".join(leaf.replace("_proj", "") for leaf in acc_leaves)
    headers = [
        "method",
        "refresh only s",
        "update w/ refresh s",
        "update w/o refresh s",
        f"refresh extra per step at gap {gap} s",
        "first call (compile) s",
    ]
    if acc_leaves:
        headers += [f"max sin angle vs exact ({short})", f"energy vs exact ({short})"]
    rows = []
    for method, r in payload["results"].items():
        if "error" in r:
            rows.append([LABELS[method], r["error"][:80]] + ["-"] * (len(headers) - 2))
            continue
        plain = r.get("update_plain", {}).get("median_s")
        ref = r.get("update_refresh", {}).get("median_s")
        only = r.get("refresh_only", {}).get("median_s")
        first = r.get("update_refresh", r.get("update_plain", r.get("refresh_only")))
        row = [
            LABELS[method],
            common.fmt_s(only),
            common.fmt_s(ref),
            common.fmt_s(plain),
            common.fmt_s(max(ref - plain, 0.0) / gap) if ref is not None else "-",
            common.fmt_s(first["first_call_s"]),
        ]
        if acc_leaves:
            acc = payload["accuracy"].get(method)
            if method == "exact":
                row += ["0 (reference)", "1 (reference)"]
            elif method == "adam":
                row += ["", ""]
            elif acc:
                row += [
                    " / ".join(f"{acc[leaf]['max_sin_angle']:.3f}" for leaf in acc_leaves),
                    " / ".join(f"{acc[leaf]['energy_ratio']:.4f}" for leaf in acc_leaves),
                ]
            else:
                row += ["-", "-"]
        rows.append(row)
    lines.append(common.markdown_table(headers, rows))
    lines.append("")
    lines.append(
        f"Gradients: rank-{settings['signal_rank']} signal with singular values "
        f"(i+1)^-{settings['decay']:g} plus noise at {settings['noise']:g} x the r-th; "
        f"warm start from the basis of a gradient with factors drifted by "
        f"{settings['drift']:g}. Accuracy on layer 0 of each listed leaf (sides: "
        + ", ".join(f"{k.replace('_proj', '')} {shape['sides'][k]}" for k in acc_leaves)
        + ")."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/update_cost.py: the static cost harness runs and reads the compiled program right."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import update_cost  # noqa: E402


def test_solver_calls_reads_custom_calls_and_opcodes():
    hlo = "\n".join(
        [
            "%cholesky.0 = (f32[24,520,520]{1,2,0}, s32[24]{0}) custom-call(%a), "
            'custom_call_target="cusolver_potrf_ffi"',
            "%eigh.0 = (f32[24,520,520]{1,2,0}, f32[24,520]{1,0}, s32[24]{0}) custom-call(%b), "
            'custom_call_target="lapack_ssyevd_ffi"',
            "%eigh.1 = (f32[24,520,520]{1,2,0}, f32[24,520]{1,0}, s32[24]{0}) custom-call(%c), "
            'custom_call_target="lapack_ssyevd_ffi"',
            "%ts = f32[8,64,64]{2,1,0} triangular-solve(%l, %r), left_side=true, lower=true",
            "%fusion.3 = f32[24,2048,512]{2,1,0} fusion(%g, %p), kind=kOutput",
            '%cc = f32[4]{0} custom-call(%x), custom_call_target="SomethingElse"',
        ]
    )
    calls = update_cost.solver_calls(hlo)
    assert calls == {
        ("cholesky", "f32", "24,520,520"): 1,
        ("eigh", "f32", "24,520,520"): 2,
        ("triangular_solve", "f32", "8,64,64"): 1,
    }


def test_with_constant_count_replaces_only_int32_counts():
    params = {"w": jnp.ones((4, 3))}
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(lambda c: 1.0))
    state = tx.init(params)
    fixed = update_cost.with_constant_count(state, 7)
    assert int(fixed[0].count) == 7 and int(fixed[1].count) == 7
    assert fixed[0].mu["w"].shape == (4, 3)
    stacked = jax.vmap(tx.init)({"w": jnp.ones((5, 4, 3))})  # a layer-wise state's
    assert update_cost.with_constant_count(stacked, 2)[0].count.tolist() == [2] * 5


@pytest.mark.slow  # a benchmark run end to end: on demand
def test_update_cost_end_to_end_on_tiny_llama(tmp_path, capsys):
    out = tmp_path / "cost.json"
    code = update_cost.main(
        [
            "--config",
            str(REPO_ROOT / "configs" / "llama_tiny.yaml"),
            "--gap",
            "10",
            "--optimizers",
            "adamw",
            "galore",
            "--time-solvers",
            "--reps",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = {r["optimizer"]: r for r in json.loads(out.read_text())["results"]}
    adamw, galore = results["adamw"]["phases"], results["galore"]["phases"]
    assert set(adamw) == {"steady"} and adamw["steady"]["solver_calls"] == []
    # Between refreshes the refresh branch is folded away: no factorization runs.
    assert galore["steady"]["solver_calls"] == []
    kinds = {}
    for c in galore["refresh"]["solver_calls"]:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + c["calls"]
    # The 7 projected leaves refresh together, so each factorisation step is one call
    # for all of them: one Rayleigh-Ritz eigh; five two-pass Cholesky-QRs (warm block,
    # sketch, two power-iteration products, and the random completion of directions
    # without gradient energy, in a lax.cond branch that runs only when such a direction
    # exists), each pass one Cholesky and one solve.
    assert kinds["eigh"] == 1 and kinds["cholesky"] == kinds["triangular_solve"] == 10
    assert galore["refresh_extra"]["solver_s"] > 0
    # GaLore's update adds the projection matmuls but moves fewer bytes than AdamW's.
    assert galore["steady"]["flops"] > 2 * adamw["steady"]["flops"]
    assert galore["steady"]["in_out_bytes"] < adamw["steady"]["in_out_bytes"]
    assert galore["refresh_extra"]["flops"] > 0
    # Every update reads each projected gradient at least once and writes its update.
    for phase in (adamw["steady"], galore["steady"]):
        assert phase["full_size_passes_per_leaf"] >= 2
    # GaLore's steady update: the clip's norm, the projection, the projection back (the
    # clip factor, lr and scale multiply the low-rank arrays); AdamW's is 5 here.
    assert galore["steady"]["full_size_passes_per_leaf"] <= 3
    # Each refresh eigh is also timed with Jacobi where the backend has it (GPU/TPU).
    (eigh_row,) = json.loads(out.read_text())["eigh_implementations"]
    assert eigh_row["default_s"] > 0
    if jax.devices()[0].platform == "cpu":
        assert "not supported on CPU" in eigh_row["jacobi"]
    else:
        assert eigh_row["jacobi_s"] > 0
    table = capsys.readouterr().out
    assert "default vs Jacobi" in table
    # The 7 leaves' 4 stacked layers' eigh is one batched call, or one per matrix on a CPU
    # with several devices (linalg._per_matrix_on_cpu, the jaxlib LAPACK deadlock fix).
    eigh = "1x eigh f32[40,40]" if jax.local_device_count() > 1 else "1x eigh f32[28,40,40]"
    assert "| galore | refresh extra |" in table and eigh in table


def test_full_size_passes_counts_top_level_ops_on_leaf_sized_arrays():
    hlo = """
%fused_computation.1 (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %m = f32[4,8]{1,0} multiply(%p, %p)
}

ENTRY %main (g: f32[4,8], h: f32[2,3]) -> f32[4,8] {
  %g = f32[4,8]{1,0} parameter(0)
  %h = f32[2,3]{1,0} parameter(1)
  %n = f32[] reduce(%g, %c), dimensions={0,1}, to_apply=%fused_computation.1
  %f = f32[32]{0} fusion(%g), kind=kLoop, calls=%fused_computation.1
  %s = f32[2,3]{1,0} negate(%h)
  ROOT %r = f32[4,8]{1,0} add(%g, %g)
}
"""
    # reduce, the fusion (reads g; its body is not counted) and add touch 32 values; negate not.
    assert update_cost.full_size_passes(hlo, [32]) == 3
    assert update_cost.full_size_passes(hlo, [32, 32]) == 1.5  # two leaves of one size


def test_full_size_passes_can_leave_conditional_branches_out():
    hlo = """
%refresh (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %e = f32[4,8]{1,0} exponential(%p)
}

%keep (p: f32[4,8]) -> f32[4,8] {
  ROOT %p = f32[4,8]{1,0} parameter(0)
}

%body (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %i = s32[] constant(0)
  %c = f32[4,8]{1,0} conditional(%i, %p, %p), branch_computations={%keep, %refresh}
  ROOT %n = f32[4,8]{1,0} negate(%c)
}

%once (p: f32[4,8]) -> pred[] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %f = pred[] constant(false)
}

ENTRY %main (g: f32[4,8]) -> f32[4,8] {
  %g = f32[4,8]{1,0} parameter(0)
  ROOT %w = f32[4,8]{1,0} while(%g), condition=%once, body=%body
}
"""
    # With branches: the while and conditional ops, the refresh's exponential, the negate.
    assert update_cost.full_size_passes(hlo, [32]) == 4
    # Steady: only the negate; the branch and the control-flow op are left out.
    assert update_cost.full_size_passes(hlo, [32], branches=False) == 1


@pytest.mark.slow  # two whole-step compiles on 8 devices: a benchmark option, on demand
def test_whole_step_counts_the_steady_train_step(tmp_path):
    """--whole-step: the standard and the layer-wise step compile from abstract shapes;
    between refreshes neither counts the refresh branch, and the standard step touches
    each projected leaf more often than its update alone (forward and backward use it)."""
    out = tmp_path / "cost.json"
    argv = ["--config", str(REPO_ROOT / "configs" / "llama_tiny.yaml"), "--gap", "10"]
    argv += ["--batch-size", "8", "--seq-len", "32", "--whole-step", "--out", str(out)]
    assert update_cost.main(argv + ["--optimizers", "galore", "galore_layerwise"]) == 0
    results = {r["optimizer"]: r for r in json.loads(out.read_text())["results"]}
    standard, layerwise = results["galore"], results["galore_layerwise"]
    steady = standard["phases"]["steady"]["full_size_passes_per_leaf"]
    assert standard["whole_step"]["full_size_passes_per_leaf"] > steady
    assert layerwise["whole_step"]["full_size_passes_per_leaf"] > 0
    assert 0 < standard["whole_step"]["flops"] and 0 < layerwise["whole_step"]["hlo_bytes"]


@pytest.mark.slow  # a benchmark harness run
def test_refresh_benchmark_runs_every_method_on_a_tiny_shape(tmp_path):
    """benchmarks/refresh.py injects projectors into the transform's state: it must
    follow the state's layout (a failure there only shows as an 'error' cell)."""
    import refresh  # noqa: E402  (benchmarks/ is on sys.path above)

    out = tmp_path / "refresh.json"
    argv = ["--shape", "small", "--layers", "1", "--hidden", "32", "--intermediate", "64"]
    argv += ["--rank", "8", "--signal-rank", "4", "--reps", "1", "--out", str(out)]
    assert refresh.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    for method in ("exact", "randomized", "randomized_warm"):
        assert "error" not in json.dumps(results[method]), results[method]
        assert results[method]["update_refresh"]

"""FNO through train.py, and Tensor-GaLore on the FNO's complex spectral weights.

* ``train.py --config configs/fno_{darcy,burgers}.yaml`` (tiny overrides) runs
  as a subprocess, reports ``val_l2``, and resumes exactly mid-run.
* Tensor-GaLore on a real FNO param tree under ``jax.jit``: factors refresh at
  step ``update_proj_gap`` (not before), updates stay complex64, and the
  state of the spectral weights is exactly the analytic Tucker size.
* The FNO learns Burgers with Tensor-GaLore (test L2 far below the mean predictor).
* Zero-shot super-resolution sets (``data.eval_resolutions``): checked, the same
  test problems on the finer grid, logged as ``val_l2_res<N>``; a resume on
  other training data (``data.resolution``) is refused; float64 FNOs need x64.
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_runs import subprocess_env

import galore_jax as gj
import train
from models import fno
from tasks.fno.task import (
    GALORE_SPECTRAL_ONLY,
    ArrayBatchIterator,
    build_fno_task,
    check_eval_resolutions,
    eval_batches,
    load_pde_data,
    trivial_l2,
)
from tasks.registry import load_config
from training import optim
from training.config import ConfigError, OptimizerConfig
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240

COMMON = [
    "steps=4",
    "batch_size=4",
    "log_every=1",
    "eval_every=2",
    "progress_bar=false",
    "checkpoint.every=0",
    "optimizer.update_proj_gap=2",
    "data.n_train=16",
    "data.n_test=6",  # 6 = one full batch of 4 + a padded one
    "model.width=8",
    "model.num_layers=2",
    "model.projection_channels=16",
]
TINY = {
    "darcy": [*COMMON, "data.resolution=16", "model.modes=[4,4]"],
    "burgers": [*COMMON, "data.resolution=32", "model.modes=6"],
}


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def run_train(dataset, output_dir, cache, *overrides, devices=1):
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        f"configs/fno_{dataset}.yaml",
        *TINY[dataset],
        f"output_dir={output_dir}",
        *overrides,
    ]
    env = subprocess_env(devices)
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_train_py_fno_darcy_reports_val_l2(tmp_path, xla_cache):
    """Matrix GaLore, on a 2-device explicit mesh with gradient accumulation."""
    out = tmp_path / "darcy"
    proc = run_train(
        "darcy",
        out,
        xla_cache,
        "optimizer.name=galore",
        "mesh.kind=explicit",
        "grad_accum_steps=2",
        devices=2,
    )
    records = read_metrics(str(out))
    val = {r["step"]: r["val_l2"] for r in records if "val_l2" in r}
    assert sorted(val) == [2, 4]
    assert all(0 < v < 2 for v in val.values()), val
    assert "darcy 16x16" in proc.stdout and "2 devices" in proc.stdout
    # The FNO task's default for matrix GaLore: only the spectral weights, as matrices.
    config_text = (out / "config.yaml").read_text()
    assert "spectral_weight: galore" in config_text


def test_train_py_fno_burgers_resumes_exactly(tmp_path, xla_cache):
    """Tensor-GaLore, refreshing every 2 steps; stop at 3 and resume to 4 = one run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train("burgers", straight, xla_cache, "optimizer.name=tensor_galore")
    run_train("burgers", resumed, xla_cache, "optimizer.name=tensor_galore", "stop_after=3")
    proc = run_train("burgers", resumed, xla_cache, "optimizer.name=tensor_galore")
    assert "resumed from step 3" in proc.stdout

    def by_step(path, key):
        return {r["step"]: r[key] for r in read_metrics(str(path)) if key in r}

    assert by_step(straight, "val_l2").keys() == {2, 4}
    assert by_step(resumed, "loss") == pytest.approx(by_step(straight, "loss"), rel=1e-5)
    assert by_step(resumed, "val_l2")[4] == pytest.approx(by_step(straight, "val_l2")[4], rel=1e-5)


# ---------------------------------------------------------------------------
# In-process pieces
# ---------------------------------------------------------------------------


def test_fno_config_errors():
    with pytest.raises(ConfigError, match="model.modes"):
        load_config("configs/fno_darcy.yaml", ["data.resolution=16", "model.modes=[12,8]"])
    with pytest.raises(ConfigError, match="model.modes"):
        load_config("configs/fno_darcy.yaml", ["model.modes=[8]"])
    with pytest.raises(ConfigError, match="even"):
        load_config("configs/fno_burgers.yaml", ["data.resolution=63"])
    with pytest.raises(ConfigError, match="n_train"):
        load_config("configs/fno_burgers.yaml", ["data.n_train=8", "batch_size=16"])


def test_batch_iterator_state_round_trip():
    x = np.arange(10, dtype=np.float32)[:, None]
    it = ArrayBatchIterator(x, -x, global_batch_size=4, seed=3)
    for _ in range(3):  # into the second epoch (2 batches per epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["x"] for _ in range(4)]
    other = ArrayBatchIterator(x, -x, global_batch_size=4, seed=0)
    other.set_state(state)
    got = [next(other)["x"] for _ in range(4)]
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="lacks"):
        other.set_state({"seed": 0})


def test_eval_batches_weights_give_the_exact_mean():
    errors = np.asarray([0.1, 0.2, 0.3, 0.4, 0.5, 0.9], np.float32)
    x = errors[:, None]
    batches = eval_batches(x, x, 4, process_index=0, process_count=1)
    assert [len(b["x"]) for b in batches] == [4, 4]
    per_batch = [np.mean(b["x"][:, 0] * b["weight"]) for b in batches]
    np.testing.assert_allclose(np.mean(per_batch), errors.mean(), rtol=1e-6)


def _small_fno(dim=2):
    config = fno.FNOConfig(
        dim=dim, width=8, modes=(4, 3) if dim == 2 else 6, num_layers=2, projection_channels=16
    )
    model = fno.FNO(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.as_pure(params)


def _tensor_galore_states(state):
    found = []

    def visit(node):
        if isinstance(node, gj.tensor_galore.ScaleByTensorGaloreState):
            found.append(node)
            return True
        return False

    jax.tree.map(lambda _: None, state, is_leaf=visit)
    return found


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_tensor_galore_on_fno_spectral_weights():
    graphdef, params = _small_fno()
    gap, rank = 3, 0.25  # core + factors: a quarter of each spectral tensor's entries
    tx = gj.tensor_galore_adamw(1e-3, rank=rank, update_proj_gap=gap, scale=0.25, svd="exact")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(gap + 2, 4, 12, 10, 1)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(gap + 2, 4, 12, 10, 1)), jnp.float32)

    def loss_fn(p, xb, yb):
        return fno.relative_l2(nnx.merge(graphdef, p)(xb), yb)

    @jax.jit
    def step(p, s, xb, yb):
        grads = fno.conjugate_complex_grads(jax.grad(loss_fn)(p, xb, yb))
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, updates

    state = jax.jit(tx.init)(params)
    spectral = {
        path: leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if jnp.iscomplexobj(leaf)
    }
    assert len(spectral) == 4 and all(v.ndim == 4 for v in spectral.values())

    # Exact state size: sum_k d_k r_k factor entries + 2 prod_k r_k core moments
    # (Adam's mu and nu), all complex64.
    analytic = 0
    for leaf in spectral.values():
        ranks = gj._tucker_plan.tucker_ranks_for_fraction(leaf.shape, rank)  # of the entries
        analytic += (sum(d * r for d, r in zip(leaf.shape, ranks)) + 2 * math.prod(ranks)) * 8
    (tg,) = _tensor_galore_states(state)
    assert _nbytes(tg.factors) + _nbytes(tg.base_state) - 4 == analytic  # - Adam's count
    report = gj.memory_report(state, params)
    scalars = 4 + 8 + 4 + 4  # counter, PRNG key, skipped refreshes, Adam's counter
    assert report["per_label"]["tensor_galore"] == analytic + scalars
    assert report["per_label"]["tensor_galore"] < 0.25 * gj.memory.adamw_state_bytes(
        {str(k): v for k, v in spectral.items()}
    )

    history = []
    for i in range(gap + 2):
        params, state, updates = step(params, state, x[i], y[i])
        (tg,) = _tensor_galore_states(state)
        history.append(jax.tree.map(np.asarray, tg.factors))
        for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
            if path in spectral:
                assert u.dtype == jnp.complex64, path
                assert bool(jnp.all(jnp.isfinite(u.real) & jnp.isfinite(u.imag)))
                assert float(jnp.abs(u.imag).max()) > 0
        assert int(tg.count) == i + 1

    def same(a, b):
        return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    # Update i runs with count i: refresh at count 0 and count == gap only.
    for i in range(1, gap):
        assert same(history[i], history[0]), f"factors changed at step {i} < gap"
    assert not same(history[gap], history[gap - 1]), "factors did not refresh at the gap"
    assert same(history[gap + 1], history[gap])
    # Factors have orthonormal columns.
    for f in jax.tree.leaves(history[gap]):
        np.testing.assert_allclose(f.conj().T @ f, np.eye(f.shape[1]), atol=1e-4)


def test_fno_learns_burgers_with_tensor_galore():
    overrides = [
        "optimizer.name=tensor_galore",
        "steps=150",
        "batch_size=16",
        "data.n_train=96",
        "data.n_test=32",
        "data.resolution=64",
        "model.width=16",
        "model.modes=8",
        "model.num_layers=3",
        "model.projection_channels=32",
        "optimizer.lr=6e-3",
        "optimizer.scale=1.0",
    ]
    config = load_config("configs/fno_burgers.yaml", overrides)
    task = config.build_task()
    opt_cfg = task.optimizer_defaults(config.optimizer)
    graphdef, params = nnx.split(task.make_model(nnx.Rngs(0)), nnx.Param)
    params = nnx.as_pure(params)
    tx, _ = optim.build_optimizer(opt_cfg, config.steps, params=params)
    state = tx.init(params)
    tg_labels = gj.memory_report(state, params)["per_label"]
    assert "tensor_galore" in tg_labels

    def loss_of(p, batch):
        return task.loss_fn(nnx.merge(graphdef, p), batch)

    @jax.jit
    def step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_of)(p, batch)
        updates, s = tx.update(task.postprocess_grads(grads), s, p)
        return optax.apply_updates(p, updates), s, loss

    for _ in range(config.steps):
        params, state, _ = step(params, state, next(task.train_iterator))
    evaluate = jax.jit(lambda p, b: task.eval_loss_fn(nnx.merge(graphdef, p), b))
    test_l2 = float(np.mean([float(evaluate(params, b)) for b in task.eval_batches()]))
    data = load_pde_data(config.data)
    trivial = trivial_l2(data.y_train, data.y_test)
    print(f"burgers test L2 with tensor_galore: {test_l2:.4f} (mean predictor {trivial:.4f})")
    assert trivial > 0.5
    assert test_l2 < 0.1 * trivial, (test_l2, trivial)


def test_optimizer_defaults_for_fno_galore():
    config = load_config("configs/fno_darcy.yaml", ["optimizer.name=galore"])
    graphdef, params = _small_fno()
    # galore: spectral weights flattened to (in, out * modes), others plain Adam.
    cfg = dataclasses.replace(config.optimizer, label_overrides=dict(GALORE_SPECTRAL_ONLY))
    tx, _ = optim.build_optimizer(cfg, 10, params=params)
    report = gj.memory_report(tx.init(params), params)
    assert set(report["per_label"]) >= {"galore", "adam"}


def _tucker_ranks(tx, params) -> dict:
    return {
        path: row.rank
        for path, row in gj.describe(tx, params).by_path().items()
        if row.side == "tucker"
    }


@pytest.mark.parametrize(
    "rank, mode", [(0.25, "params"), ([4, 4, 2, 2], "params"), ([4, 4, None, 3], "params")]
)
def test_train_py_and_the_library_read_a_tucker_rank_alike(rank, mode):
    """One meaning of a float rank (a fraction of each tensor's entries, as in
    neuraloperator) in train.py and galore_jax; per-mode lists accepted by train.py."""
    _, params = _small_fno()
    cfg = OptimizerConfig(name="tensor_galore", rank=rank, tensor_rank_mode=mode)
    ours, _ = optim.build_optimizer(cfg, 10, params=params)
    library_rank = tuple(rank) if isinstance(rank, list) else rank
    library = gj.tensor_galore_adamw(1e-3, rank=library_rank)
    got, want = _tucker_ranks(ours, params), _tucker_ranks(library, params)
    assert len(got) == 4 and got == want
    if rank == 0.25:  # spectral weights (8, 8, 4, 3): core + factors ~ 25% of the entries
        assert set(got.values()) == {gj._tucker_plan.tucker_ranks_for_fraction((8, 8, 4, 3), 0.25)}


def test_tensor_rank_mode_mode_is_a_per_mode_fraction():
    _, params = _small_fno()
    cfg = OptimizerConfig(name="tensor_galore", rank=0.5, tensor_rank_mode="mode")
    ours, _ = optim.build_optimizer(cfg, 10, params=params)
    assert set(_tucker_ranks(ours, params).values()) == {(4, 4, 2, 2)}


def test_per_mode_rank_list_is_for_tensor_galore_only():
    with pytest.raises(ConfigError, match="per-mode list is for tensor_galore"):
        load_config("configs/fno_darcy.yaml", ["optimizer.name=galore", "optimizer.rank=[4,4]"])


# ---------------------------------------------------------------------------
# Zero-shot super-resolution, resuming on other data, float64
# ---------------------------------------------------------------------------

# In-process train.main runs see the 8 virtual CPU devices of tests/conftest.py.
IN_PROCESS = [
    *COMMON,
    "batch_size=8",
    "data.n_train=16",
    "data.n_test=6",
    "data.resolution=16",
    "model.modes=[4,4]",
]


def _with_eval_resolutions(path, overrides, resolutions):
    """A loaded config with ``data.eval_resolutions`` set (unchecked: the task checks it)."""
    config = load_config(path, overrides)
    object.__setattr__(config.data, "eval_resolutions", resolutions)
    return config


@pytest.mark.parametrize(
    "config_path, overrides, resolutions, message",
    [
        ("darcy", [], 64, "must be a list"),
        ("darcy", [], [0], "positive ints, got 0"),
        ("darcy", [], [True], "positive ints, got True"),
        ("darcy", [], ["64"], "positive ints, got '64'"),
        ("darcy", [], [64, 64], "lists 64 twice"),
        ("darcy", [], [2], "darcy generator needs >= 3"),
        ("darcy", [], [12], r"grid 12 \(model.padding=0\) cannot hold model.modes=\[8, 8\]"),
        ("darcy", ["data.pointwise_normalizer=true"], [64], "pointwise_normalizer=false"),
        ("burgers", [], [65], "burgers generator needs even grids, got 65"),
    ],
)
def test_eval_resolutions_are_checked(config_path, overrides, resolutions, message):
    config = load_config(f"configs/fno_{config_path}.yaml", overrides)
    with pytest.raises(ConfigError, match=r"^data\.eval_resolutions.*" + message):
        check_eval_resolutions(resolutions, config.data, config.model)
    # The training grid itself is fine even with a pointwise normaliser; so are finer ones.
    assert check_eval_resolutions(
        [32, 64], load_config(f"configs/fno_{config_path}.yaml").data, config.model
    ) == (32, 64)
    assert check_eval_resolutions(None, config.data, config.model) == ()


def test_super_resolution_sets_are_the_test_problems_on_the_finer_grid():
    """Darcy at 17 nodes, tested also at 33: the nodes of 17 are every 2nd of 33."""
    overrides = [
        *COMMON,
        "data.n_train=8",
        "data.n_test=6",
        "data.resolution=17",
        "model.modes=[4,4]",
    ]
    config = _with_eval_resolutions("configs/fno_darcy.yaml", overrides, [17, 33])
    task = build_fno_task(config)
    sets = task.extra_eval_sets()
    assert list(sets) == ["val_l2_res17", "val_l2_res33"]
    assert sets["val_l2_res17"] is task.eval_batches()  # the test split itself
    coarse, fine = task.eval_batches(), sets["val_l2_res33"]
    assert [b["x"].shape for b in fine] == [(4, 33, 33, 1)] * 2
    for c, f in zip(coarse, fine):
        np.testing.assert_array_equal(f["weight"], c["weight"])
        # Same permeability (encoded by the training normaliser) at the shared nodes ...
        np.testing.assert_array_equal(f["x"][:, ::2, ::2], c["x"])
        # ... and the pressure of the same problem, to the coarse grid's discretisation error.
        diff = np.linalg.norm(f["y"][:, ::2, ::2] - c["y"]) / np.linalg.norm(c["y"])
        assert diff < 0.05, diff
    # The model runs on either grid; eval_loss_fn gives a relative L2 on each.
    graphdef, params = nnx.split(task.make_model(nnx.Rngs(0)), nnx.Param)
    evaluate = jax.jit(lambda p, b: task.eval_loss_fn(nnx.merge(graphdef, p), b))
    for batches in sets.values():
        value = float(np.mean([float(evaluate(params, b)) for b in batches]))
        assert 0.1 < value < 10, value


def test_train_logs_val_l2_per_eval_resolution(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(
        [
            "--config",
            "configs/fno_darcy.yaml",
            *IN_PROCESS,
            "data.eval_resolutions=[16,24]",
            f"output_dir={out}",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    evals = [r for r in read_metrics(str(out)) if "val_l2" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r) == {"step", "val_l2", "val_l2_res16", "val_l2_res24"}, r
        assert r["val_l2_res16"] == r["val_l2"]  # the training grid: the test split itself
        assert 0 < r["val_l2_res24"] < 2
    assert "test also at 16x16, 24x24" in stdout
    assert f"step      4 | val_l2 {evals[1]['val_l2']:.4f} | val_l2_res16" in stdout
    assert f"val_l2_res24 {evals[1]['val_l2_res24']:.4f}" in stdout
    other = tmp_path / "other"
    code = train.main(
        [
            "--config",
            "configs/fno_darcy.yaml",
            *IN_PROCESS,
            "data.eval_resolutions=[6]",  # too coarse for modes [4, 4]
            f"output_dir={other}",
        ]
    )
    assert code == 2
    assert "error: data.eval_resolutions: the grid 6" in capsys.readouterr().err
    assert not other.exists()


def _snapshot(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_resume_on_other_training_data_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", "configs/fno_darcy.yaml", *IN_PROCESS, f"output_dir={out}"]
    assert train.main([*args, "stop_after=2"]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert train.main([*args, "data.resolution=20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint step 2: cannot continue the data stream"), err
    assert "data.resolution=16, this run has data.resolution=20" in err, err
    assert _snapshot(out) == before  # nothing written: config.yaml, metrics, checkpoints


def test_iterator_state_records_the_training_data():
    x = np.arange(8, dtype=np.float32)[:, None]
    ident = {"dataset": "darcy", "resolution": 32, "n_train": 8, "seed": 0}
    it = ArrayBatchIterator(x, x, global_batch_size=4, data_id=ident)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    ArrayBatchIterator(x, x, global_batch_size=4, data_id=ident).set_state(state)
    other = ArrayBatchIterator(x, x, global_batch_size=4, data_id={**ident, "seed": 1})
    with pytest.raises(ValueError, match="data.seed=0, this run has data.seed=1"):
        other.set_state(state)
    # States saved before the data were recorded are taken as they are.
    other.set_state({k: state[k] for k in ("seed", "epoch", "position")})


def test_float64_fno_needs_x64():
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="param_dtype='float64' needs 64-bit JAX"):
        fno.FNOConfig(dim=1, width=4, modes=3, param_dtype="float64")
    with jax.enable_x64(True):
        config = fno.FNOConfig(dim=1, width=4, modes=3, param_dtype="float64")
        model = fno.FNO(config, rngs=nnx.Rngs(0))
        dtypes = {str(v.dtype) for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
        assert dtypes == {"float64", "complex128"}

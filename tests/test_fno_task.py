"""FNO through train.py, and Tensor-GaLore on the FNO's complex spectral weights.

* ``train.py --config configs/fno_{darcy,burgers}.yaml`` (tiny overrides) runs
  as a subprocess, reports ``val_l2``, and resumes exactly mid-run.
* Tensor-GaLore on a real FNO param tree under ``jax.jit``: factors refresh at
  step ``update_proj_gap`` (not before), updates stay complex64, and the
  state of the spectral weights is exactly the analytic Tucker size.
* The FNO learns Burgers with Tensor-GaLore (test L2 far below the mean predictor).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax as gj
from models import fno
from training import optim
from training.config import ConfigError, OptimizerConfig, load_config
from training.fno_task import (
    GALORE_SPECTRAL_ONLY,
    ArrayBatchIterator,
    eval_batches,
    load_pde_data,
    trivial_l2,
)
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
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
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
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


def test_tucker_ranks_for_param_fraction():
    for shape, fraction in [((24, 24, 8, 8), 0.25), ((32, 32, 16), 0.25), ((16, 16, 6, 6), 0.5)]:
        ranks = optim.tucker_ranks_for_param_fraction(shape, fraction)
        kept = math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))
        # Rounding each rank moves the count a little; the target is met roughly.
        assert 0.6 * fraction < kept / math.prod(shape) < 1.5 * fraction, (shape, ranks)
    assert optim.tucker_ranks_for_param_fraction((24, 24, 8, 8), 0.25) == (17, 17, 6, 6)


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
        if isinstance(node, gj.ScaleByTensorGaloreState):
            found.append(node)
            return True
        return False

    jax.tree.map(lambda _: None, state, is_leaf=visit)
    return found


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_tensor_galore_on_fno_spectral_weights():
    graphdef, params = _small_fno()
    gap, rank = 3, 0.5
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
        ranks = [max(1, round(rank * d)) for d in leaf.shape]
        analytic += (sum(d * r for d, r in zip(leaf.shape, ranks)) + 2 * math.prod(ranks)) * 8
    (tg,) = _tensor_galore_states(state)
    assert _nbytes(tg.factors) + _nbytes(tg.base_state) - 4 == analytic  # - Adam's count
    report = gj.memory_report(state, params)
    scalars = 4 + 8 + 4 + 4  # counter, PRNG key, skipped refreshes, Adam's counter
    assert report["per_label"]["tensor_galore"] == analytic + scalars
    assert report["per_label"]["tensor_galore"] < 0.25 * gj.adamw_state_bytes(
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


def test_optimizer_defaults_and_param_fraction_rank():
    config = load_config("configs/fno_darcy.yaml", ["optimizer.name=galore"])
    graphdef, params = _small_fno()
    # galore: spectral weights flattened to (in, out * modes), others plain Adam.
    cfg = dataclasses.replace(config.optimizer, label_overrides=dict(GALORE_SPECTRAL_ONLY))
    tx, _ = optim.build_optimizer(cfg, 10, params=params)
    report = gj.memory_report(tx.init(params), params)
    assert set(report["per_label"]) >= {"galore", "adam"}
    # tensor_rank_mode=params turns rank 0.25 into per-mode ranks for the spectral shape.
    cfg = OptimizerConfig(
        name="tensor_galore", rank=0.25, tensor_rank_mode="params", update_proj_gap=5
    )
    tx, _ = optim.build_optimizer(cfg, 10, params=params)
    (tg,) = _tensor_galore_states(tx.init(params))
    want = optim.tucker_ranks_for_param_fraction((8, 8, 4, 3), 0.25)
    ranks = {}  # param path -> rank of each mode (factors[k] holds mode k's factor per param)
    for tree in tg.factors:
        for path, f in jax.tree_util.tree_flatten_with_path(tree)[0]:
            ranks.setdefault(gj.path_string(path), []).append(f.shape[1])
    assert len(ranks) == 4
    for per_mode in ranks.values():
        assert tuple(per_mode) == want
    with pytest.raises(ConfigError, match="float"):
        optim.build_optimizer(dataclasses.replace(cfg, rank=2), 10, params=params)

"""Checkpointer: round trip, resharding onto another mesh, damaged checkpoints.

Runs in-process on the 8 virtual CPU devices of conftest.py, with tiny trees.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from training import mesh as mesh_lib
from training.checkpoint import Checkpointer, CheckpointError
from training.metrics import MetricsLogger, read_metrics

CONFIG = {"task": "lm", "model": {"hidden_size": 8}, "optimizer": {"name": "adamw"}}


def make_state(mesh):
    """Params, optimizer state (Adam moments, counters, a PRNG key) and shardings."""
    params = {"w": jnp.arange(64.0).reshape(8, 8), "layers": {"b": jnp.ones(8)}}
    param_shardings = {
        "w": NamedSharding(mesh, P("fsdp", None)),
        "layers": {"b": NamedSharding(mesh, P())},
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    abstract_params = jax.eval_shape(lambda: params)
    init = lambda p: (tx.init(p), jax.random.key(7))  # noqa: E731
    abstract_state = jax.eval_shape(init, abstract_params)
    state_shardings = gj.state_shardings(abstract_state, abstract_params, param_shardings)
    params = jax.device_put(params, param_shardings)
    state = jax.device_put(init(params), state_shardings)
    # One update so the moments and counters are not trivial.
    grads = jax.tree.map(lambda x: x * 0.1, params)
    updates, opt = tx.update(grads, state[0], params)
    state = (opt, state[1])
    return dict(
        params=params,
        param_shardings=param_shardings,
        abstract_params=abstract_params,
        state=state,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
    )


def save(directory, step, s, config=CONFIG):
    ckpt = Checkpointer(str(directory))
    ckpt.save(
        step,
        params=s["params"],
        opt_state=s["state"],
        data_state={"position": step},
        config=config,
        mesh_shape={"data": 2, "fsdp": 4, "tensor": 1},
    )
    ckpt.close()


def restore(directory, step, s):
    return Checkpointer(str(directory)).restore(
        step,
        abstract_params=s["abstract_params"],
        param_shardings=s["param_shardings"],
        abstract_opt_state=s["abstract_state"],
        opt_state_shardings=s["state_shardings"],
    )


@pytest.fixture(scope="module")
def mesh8():
    return mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh8):
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    s = make_state(mesh8)
    save(directory, 3, s)
    return directory, s


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_shardings(saved):
    directory, s = saved
    params, state, data_state = restore(directory, 3, s)
    assert data_state == {"position": 3}
    assert_trees_equal(params, s["params"])
    assert_trees_equal(state, s["state"])
    assert params["w"].sharding.spec == P("fsdp", None)
    mu = state[0][1][0].mu["w"]
    assert mu.sharding.spec == P("fsdp", None) and len(mu.sharding.device_set) == 8
    assert jax.dtypes.issubdtype(state[1].dtype, jax.dtypes.prng_key)


def test_restore_onto_smaller_mesh(saved):
    directory, s8 = saved
    mesh4 = jax.make_mesh(
        (1, 4, 1),
        mesh_lib.MESH_AXES,
        devices=jax.devices()[:4],
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
    )
    s4 = make_state(mesh4)
    params, state, _ = restore(directory, 3, s4)
    assert_trees_equal(params, s8["params"])
    assert_trees_equal(state, s8["state"])
    assert params["w"].sharding.mesh.devices.size == 4
    assert state[0][1][0].nu["w"].sharding.spec == P("fsdp", None)


def test_half_written_checkpoint_is_never_listed(saved, tmp_path):
    directory, s = saved
    copy = tmp_path / "checkpoints"
    shutil.copytree(directory, copy)
    # What a run killed mid-save leaves: orbax's temporary directory, partly written.
    partial = copy / "4.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(copy / "3", partial)
    shutil.rmtree(partial / "opt_state")
    ckpt = Checkpointer(str(copy))
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    params, _, _ = ckpt.restore(
        3,
        abstract_params=s["abstract_params"],
        param_shardings=s["param_shardings"],
        abstract_opt_state=s["abstract_state"],
        opt_state_shardings=s["state_shardings"],
    )
    assert_trees_equal(params, s["params"])
    ckpt.close()
    assert not partial.exists()  # cleaned up at start-up


def test_config_mismatch_is_a_clear_error(saved):
    directory, _ = saved
    changed = {**CONFIG, "model": {"hidden_size": 16}}
    with pytest.raises(
        CheckpointError, match=r"model.hidden_size: checkpoint has 8, config has 16"
    ):
        Checkpointer(str(directory)).check_compatible(3, changed)
    Checkpointer(str(directory)).check_compatible(3, CONFIG)  # same: fine


def test_different_structure_or_shape_is_a_clear_error(saved, mesh8):
    directory, s = saved
    other = dict(
        s,
        abstract_params={
            "w": jax.ShapeDtypeStruct((4, 8), jnp.float32),
            "layers": {"b": jax.ShapeDtypeStruct((8,), jnp.float32)},
        },
    )
    with pytest.raises(CheckpointError, match=r"params 'w' has shape/dtype \[\[8, 8\]"):
        restore(directory, 3, other)
    renamed = dict(
        s,
        abstract_params={"v": s["abstract_params"]["w"], "layers": s["abstract_params"]["layers"]},
        param_shardings={"v": s["param_shardings"]["w"], "layers": s["param_shardings"]["layers"]},
    )
    with pytest.raises(CheckpointError, match=r"different params structure \(missing \['v'\]"):
        restore(directory, 3, renamed)


def test_corrupt_checkpoint_is_a_clear_error(saved, tmp_path):
    directory, s = saved
    copy = tmp_path / "checkpoints"
    shutil.copytree(directory, copy)
    for path in (copy / "3" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"checkpoint step 3 .* could not be restored"):
        restore(copy, 3, s)
    (copy / "3" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint step 3 .* unreadable"):
        restore(copy, 3, s)


def test_metrics_log_drops_records_after_resume_step(tmp_path):
    log = MetricsLogger(str(tmp_path))
    for step in range(1, 6):
        log.log(step, {"loss": float(step), "lr": np.float32(0.5)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a kill
    log = MetricsLogger(str(tmp_path), resume_step=3)
    log.log(4, {"loss": 40.0})
    log.close()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 40.0 and records[0]["lr"] == 0.5
    json.dumps(records)


def test_state_saved_with_a_separate_clip_stage_restores_into_galore_adamw(tmp_path, mesh8):
    """train.py chained optax.clip_by_global_norm before galore_adamw until GaLore
    clipped in the low-rank space (max_grad_norm): those checkpoints name every
    optimizer array '1/<name>'; they restore, value for value, into the new state."""
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 8)), "b": jnp.ones(8)}
    shardings = jax.tree.map(lambda _: NamedSharding(mesh8, P()), params)
    tx = gj.galore_adamw(1e-2, rank=2, update_proj_gap=2, max_grad_norm=1.0)
    legacy = optax.chain(optax.clip_by_global_norm(1.0), gj.galore_adamw(1e-2, rank=2))
    state = legacy.init(params)
    for i in range(3):
        grads = jax.tree.map(lambda x: x * (i + 1.0), params)
        _, state = legacy.update(grads, state, params)
    directory = tmp_path / "checkpoints"
    s = dict(params=params, state=state)
    save(directory, 3, s)
    abstract_state = jax.eval_shape(tx.init, params)
    state_shardings = gj.state_shardings(abstract_state, params, shardings)
    _, restored, _ = Checkpointer(str(directory)).restore(
        3,
        abstract_params=jax.eval_shape(lambda: params),
        param_shardings=shardings,
        abstract_opt_state=abstract_state,
        opt_state_shardings=state_shardings,
    )
    assert_trees_equal(restored, state[1])
    # Any other leading stage is still a different structure.
    other = optax.chain(optax.scale_by_adam(), gj.galore_adamw(1e-2, rank=2))
    save(tmp_path / "other", 3, dict(params=params, state=other.init(params)))
    with pytest.raises(CheckpointError, match="different opt_state structure"):
        Checkpointer(str(tmp_path / "other")).restore(
            3,
            abstract_params=jax.eval_shape(lambda: params),
            param_shardings=shardings,
            abstract_opt_state=abstract_state,
            opt_state_shardings=state_shardings,
        )

"""Config loading, overrides and validation (no devices, no model needed)."""

import dataclasses

import pytest
import yaml

import galore_jax as gj
from tasks.fno.config import FNOConfig, FNOModelConfig
from tasks.lm.config import LMConfig
from tasks.registry import config_from_dict, load_config
from training.config import (
    Config,
    ConfigError,
    OptimizerConfig,
    apply_overrides,
    config_to_dict,
    resolve_mesh_shape,
    validate_for_devices,
)


def write_yaml(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_load_and_round_trip():
    config = load_config(None)
    assert isinstance(config, Config)
    again = config_from_dict(config_to_dict(config))
    assert again == config


def test_yaml_and_dotted_overrides(tmp_path):
    path = write_yaml(tmp_path, {"steps": 10, "optimizer": {"name": "adamw", "lr": 0.01}})
    config = load_config(
        path,
        [
            "optimizer.lr=3e-4",
            "model.hidden_size=64",
            "mesh.rules=[[embed, fsdp], [mlp, null]]",
            "optimizer.rank=0.25",
            "optimizer.label_overrides={embed: adamw}",
        ],
    )
    assert config.steps == 10
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.model.hidden_size == 64
    assert config.mesh.rules == [["embed", "fsdp"], ["mlp", None]]
    assert config.optimizer.rank == 0.25 and isinstance(config.optimizer.rank, float)
    assert config.optimizer.label_overrides == {"embed": "adamw"}


def test_int_stays_int_for_rank_and_widens_for_float():
    config = load_config(None, ["optimizer.rank=16", "optimizer.lr=1"])
    assert config.optimizer.rank == 16 and isinstance(config.optimizer.rank, int)
    assert isinstance(config.optimizer.lr, float)


def test_unknown_key_names_key_and_closest_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr'.*'optimizer.lr'"):
        load_config(None, ["optimizer.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'step'.*'steps'"):
        load_config(None, ["step=3"])


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"'steps' expects int, got 'ten' \(str\)"):
        load_config(None, ["steps=ten"])
    with pytest.raises(ConfigError, match=r"'optimizer.name' expects one of"):
        load_config(None, ["optimizer.name=sgd"])
    with pytest.raises(ConfigError, match=r"'progress_bar' expects bool"):
        load_config(None, ["progress_bar=3"])
    with pytest.raises(ConfigError, match=r"'steps' expects int, got 1.5"):
        load_config(None, ["steps=1.5"])


def test_section_given_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'optimizer' must be a mapping"):
        load_config(None, ["optimizer=3"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_seq_len_longer_than_positions():
    with pytest.raises(ConfigError, match=r"seq_len \(512\).*max_seq_len=256"):
        load_config(None, ["seq_len=512", "model.max_seq_len=256"])


def test_data_path_required_for_file_sources():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=text"])


def test_value_ranges():
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        load_config(None, ["batch_size=10", "grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="warmup_fraction"):
        load_config(None, ["optimizer.warmup_fraction=1.5"])
    with pytest.raises(ConfigError, match="optimizer.rank as a fraction"):
        load_config(None, ["optimizer.rank=1.5"])
    with pytest.raises(ConfigError, match="at most one of"):
        load_config(None, ["mesh.data=-1", "mesh.fsdp=-1"])


def test_mesh_shape_resolution():
    config = load_config(None, ["mesh.data=-1", "mesh.fsdp=4"])
    assert resolve_mesh_shape(config, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ConfigError, match="do not divide the 6 devices"):
        resolve_mesh_shape(load_config(None, ["mesh.fsdp=4"]), 6)
    with pytest.raises(ConfigError, match="use 6 devices but 8 are available"):
        resolve_mesh_shape(load_config(None, ["mesh.data=3", "mesh.fsdp=2"]), 8)


def test_batch_and_heads_must_split_over_mesh():
    config = load_config(None, ["batch_size=6", "mesh.data=4"])
    with pytest.raises(ConfigError, match="divisible by mesh data\\*fsdp = 4"):
        validate_for_devices(config, 4)
    config = load_config(
        None, ["model.num_heads=2", "model.hidden_size=64", "mesh.data=1", "mesh.tensor=4"]
    )
    with pytest.raises(ConfigError, match=r"model.num_heads \(2\).*mesh.tensor \(4\)"):
        validate_for_devices(config, 4)


def test_apply_overrides_does_not_mutate_input():
    raw = {"optimizer": {"lr": 1.0}}
    out = apply_overrides(raw, ["optimizer.lr=2.0"])
    assert raw["optimizer"]["lr"] == 1.0 and out["optimizer"]["lr"] == 2.0


def test_shipped_configs_load():
    import glob

    paths = sorted(glob.glob("configs/llama_*.yaml"))
    assert paths, "no configs/llama_*.yaml"
    for path in paths:
        load_config(path)


def test_task_selects_the_sections():
    config = load_config(None)
    assert isinstance(config, LMConfig) and config.task == "lm"
    fno = load_config("configs/fno_darcy.yaml")
    assert isinstance(fno, FNOConfig) and isinstance(fno.model, FNOModelConfig)
    assert config_from_dict(config_to_dict(fno)) == fno
    with pytest.raises(ConfigError, match=r"'task' expects one of 'lm', 'fno', got 'xyz'"):
        load_config(None, ["task=xyz"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.width'"):
        load_config(None, ["model.width=3"])  # an fno key under task lm


def test_bool_is_not_a_number_and_ranges_name_the_key():
    with pytest.raises(
        ConfigError, match=r"'optimizer.rank' expects int or float.*, got True \(bool\)"
    ):
        load_config(None, ["optimizer.rank=true"])
    with pytest.raises(ConfigError, match=r"^optimizer.lr must be > 0, got -1$"):
        load_config(None, ["optimizer.lr=-1"])
    with pytest.raises(ConfigError, match=r"^model.num_kv_heads must be > 0 or null, got 0$"):
        load_config(None, ["model.num_kv_heads=0"])
    with pytest.raises(ConfigError, match=r"expects dict of str to str or null"):
        load_config(None, ["optimizer.label_overrides={embed: 1}"])
    with pytest.raises(
        ConfigError, match=r"^config key 'steps' expects int, got 'x' \(str\) \(and 1 more\)$"
    ):
        load_config(None, ["steps=x", "seq_len=y"])


def test_llama_shape_checked_by_the_model_config():
    with pytest.raises(
        ConfigError, match=r"model.hidden_size \(30\) must be divisible by model.num_heads \(4\)"
    ):
        load_config(None, ["model.hidden_size=30"])
    with pytest.raises(
        ConfigError, match=r"model.num_heads \(4\) must be divisible by model.num_kv_heads \(3\)"
    ):
        load_config(None, ["model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"must be even"):
        load_config(None, ["model.hidden_size=36"])


def test_empty_section_takes_defaults_and_assignment_is_checked():
    config = load_config(None, ["mesh="])
    assert config.mesh.data == -1
    config.optimizer = dataclasses.replace(config.optimizer, rank=0.5)
    assert config.optimizer.rank == 0.5
    with pytest.raises(ValueError):
        config.optimizer = 3
    with pytest.raises(ValueError):
        config.model = FNOModelConfig()
    with pytest.raises(ValueError, match="as a fraction"):
        OptimizerConfig(rank=2.0)
    assert isinstance(config, Config)


def test_svd_passes_reaches_galore_and_is_refused_elsewhere():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from training import optim

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(48, 32)), jnp.float32)}
    grads = {"w": params["w"] * 0.5 + 0.1}
    updates = {}
    for passes in (1, 2):
        cfg = OptimizerConfig(name="galore", rank=8, svd=gj.RandomizedSVD(passes=passes))
        tx, _ = optim.build_optimizer(cfg, 10, params=params)
        out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        updates[passes] = np.asarray(out["w"])
    np.testing.assert_allclose(updates[1], updates[2], rtol=1e-3, atol=1e-6)
    cfg = load_config(None, ["optimizer.name=tensor_galore", "optimizer.svd.passes=1"]).optimizer
    with pytest.raises(ConfigError, match="optimizer.svd.passes=1 applies to"):
        optim.build_optimizer(cfg, 10, params=params)
    with pytest.raises(ConfigError, match="optimizer.svd.passes must be <= 2, got 3"):
        load_config(None, ["optimizer.svd.passes=3"])
    with pytest.raises(ConfigError, match="optimizer.svd.passes must be <= 2, got 3"):
        load_config(None, ["optimizer.intermediate_passes=3"])  # 0.2.0's key


def test_svd_eigh_reaches_the_refresh_and_is_refused_elsewhere(monkeypatch):
    import jax
    import jax.numpy as jnp

    from training import optim

    params = {"w": jnp.ones((48, 32))}
    cfg = load_config(
        None, ["optimizer.name=galore", "optimizer.rank=8", "optimizer.svd.eigh=jacobi"]
    )
    if jax.default_backend() == "cpu":  # XLA:CPU has no Jacobi eigh: refused when built
        with pytest.raises(ConfigError, match="jacobi is not available on cpu"):
            optim.build_optimizer(cfg.optimizer, 10, params=params)
        # Without that check the option reaches the refresh's eigh, which XLA refuses.
        for module in (gj.linalg, gj.linalg._svd):
            monkeypatch.setattr(module, "check_eigh_available", lambda implementation: None)
        tx, _ = optim.build_optimizer(cfg.optimizer, 10, params=params)
        with pytest.raises(NotImplementedError, match="Jacobi implementation is not supported"):
            jax.jit(tx.update)(params, tx.init(params), params)
    else:
        tx, _ = optim.build_optimizer(cfg.optimizer, 10, params=params)
        jax.jit(tx.update)(params, tx.init(params), params)
    cfg = load_config(None, ["optimizer.name=adamw", "optimizer.svd.eigh=jacobi"])
    with pytest.raises(ConfigError, match="optimizer.svd.eigh=jacobi applies to"):
        optim.build_optimizer(cfg.optimizer, 10, params=params)
    with pytest.raises(ConfigError, match="optimizer.svd.eigh must be one of"):
        load_config(None, ["optimizer.svd.eigh=syevj"])
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.svd.eig'; did you mean"):
        load_config(None, ["optimizer.svd.eig=qr"])


@pytest.mark.parametrize("name", ["galore", "tensor_galore", "adamw"])
def test_global_clip_is_inside_galore_and_a_chained_stage_elsewhere(name):
    """optimizer.grad_clip (global) reaches galore_adamw / tensor_galore_adamw as
    max_grad_norm (no separate stage, no full-size pass); adamw keeps optax's clip.
    Either way the update is the one of the clip chained before the optimizer."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from training import optim

    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(48, 32)), jnp.float32),
        "t": jnp.asarray(rng.normal(size=(6, 5, 4)), jnp.float32),
    }
    grads = jax.tree.map(lambda x: x * 3.0, params)  # norm > 1: clipped
    cfg = OptimizerConfig(name=name, rank=8 if name == "galore" else 0.5, grad_clip=1.0)
    tx, _ = optim.build_optimizer(cfg, 10, params=params)
    unclipped, _ = optim.build_optimizer(dataclasses.replace(cfg, grad_clip=0), 10, params=params)
    chained = optax.chain(optax.clip_by_global_norm(1.0), unclipped)
    state = tx.init(params)
    if name == "adamw":
        assert jax.tree.structure(state) == jax.tree.structure(chained.init(params))
    else:
        assert jax.tree.structure(state) == jax.tree.structure(unclipped.init(params))
    out, _ = jax.jit(tx.update)(grads, state, params)
    want, _ = jax.jit(chained.update)(grads, chained.init(params), params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)

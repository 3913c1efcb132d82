"""optimizer.name=fira | apollo | apollo_mini: config keys reach galore_jax's aliases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import galore_jax as gj
from tasks.registry import load_config
from training import checkpoint, optim
from training.config import ConfigError

PARAMS = {
    "embed": jnp.zeros((96, 32)),
    "w": jnp.asarray(np.random.default_rng(0).normal(size=(32, 48)), jnp.float32),
    "norm": jnp.ones(32),
}


def _build(*overrides):
    cfg = load_config(None, ["optimizer.rank=8", *overrides]).optimizer
    tx, _ = optim.build_optimizer(cfg, 10, params=PARAMS)
    return tx


@pytest.mark.parametrize(
    "overrides,side,rank",
    [
        (["optimizer.name=fira"], "left", 8),
        (["optimizer.name=fira", "optimizer.projector.bits=8"], "left", 8),
        (["optimizer.name=apollo"], "random left", 8),
        (["optimizer.name=apollo", "optimizer.projection=svd"], "left", 8),
        (["optimizer.name=apollo_mini", "optimizer.adam.bits=8"], "random left", 1),
    ],
)
def test_each_name_builds_its_alias(overrides, side, rank):
    tx = _build(*overrides, "optimizer.norm_growth_limit=1.05", "optimizer.weight_decay=0.1")
    row = gj.describe(tx, PARAMS).by_path()["w"]
    assert (row.side, row.rank) == (side, rank)
    grads = jax.tree.map(lambda p: p * 0.5 + 0.1, PARAMS)
    updates, _ = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


@pytest.mark.slow  # the options' effects are unit-tested in tests/galore_jax
def test_apollo_options_change_the_update():
    grads = jax.tree.map(lambda p: p * 0.5 + 0.1, PARAMS)

    def update(*overrides):
        tx = _build(
            "optimizer.name=apollo",
            "optimizer.projection=svd",
            "optimizer.warmup_fraction=0",  # a first step at the peak lr, not 0
            *overrides,
        )
        return np.asarray(jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)[0]["w"])

    base = update()
    assert np.abs(base).max() > 1e-4
    np.testing.assert_allclose(update("optimizer.apollo_scale=4.0"), 2 * base, rtol=1e-5)
    assert not np.allclose(update("optimizer.scale_type=tensor"), base)


def test_bad_combinations_name_the_key():
    with pytest.raises(ConfigError, match="optimizer.projection=random applies to apollo"):
        _build("optimizer.name=fira", "optimizer.projection=random")
    with pytest.raises(ConfigError, match="norm_growth_limit"):
        load_config(None, ["optimizer.name=fira", "optimizer.norm_growth_limit=0.5"])


def test_projection_is_structural_for_apollo_only():
    assert checkpoint._applies("optimizer.projection", "apollo")
    assert not checkpoint._applies("optimizer.projection", "galore")
    assert "optimizer.projection" in checkpoint.STRUCTURAL_CONFIG_KEYS

"""optimizer.name=adafactor | muon: the optax baselines train.py compares against."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from tasks.registry import load_config
from training import optim
from training.config import ConfigError

RNG = np.random.default_rng(0)
# A stacked layer axis like LLaMA's scanned blocks, an embedding, a norm.
PARAMS = {
    "embed": jnp.asarray(RNG.normal(size=(96, 32)), jnp.float32),
    "layers": {"mlp": jnp.asarray(RNG.normal(size=(3, 32, 48)), jnp.float32)},
    "norm": jnp.ones(32),
    "proj": jnp.asarray(RNG.normal(size=(128, 160)), jnp.float32),  # adafactor factors it
}
DIMS = {"embed": None, "layers": {"mlp": gj.DimensionNumbers((0,))}, "norm": None, "proj": None}
NO_CLIP_NO_WARMUP = ["optimizer.grad_clip=0", "optimizer.warmup_fraction=0"]
GRADS = jax.tree.map(lambda p: jnp.tanh(p) + 0.1, PARAMS)


def _build(name, *overrides):
    cfg = load_config(None, [f"optimizer.name={name}", *NO_CLIP_NO_WARMUP, *overrides])
    tx, _ = optim.build_optimizer(cfg.optimizer, 10, params=PARAMS, dimension_numbers=DIMS)
    return tx


def test_muon_orthogonalizes_each_stacked_matrix_and_gives_the_rest_adamw():
    tx = _build("muon", "optimizer.lr=0.01")
    updates, _ = jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
    # optax's own muon on the same leaves with explicit dimension numbers.
    muon = optax.contrib.MuonDimensionNumbers
    dims = {"embed": None, "layers": {"mlp": muon(1, 2)}, "norm": None, "proj": muon(0, 1)}
    cfg = load_config(None, ["optimizer.lr=0.01", *NO_CLIP_NO_WARMUP]).optimizer
    schedule = optim.lr_schedule(cfg, 10)
    want_tx = optax.contrib.muon(
        schedule, muon_weight_dimension_numbers=dims, consistent_rms=optim.MUON_CONSISTENT_RMS
    )
    want, _ = jax.jit(want_tx.update)(GRADS, want_tx.init(PARAMS), PARAMS)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # Each layer's update is orthogonalized on its own (not across the stack):
    # singular values of one layer's direction are near-equal.
    u = np.asarray(updates["layers"]["mlp"][1], np.float64)
    s = np.linalg.svd(u, compute_uv=False)
    assert s.min() > 0.3 * s.max(), s
    # The embedding gets Adam: a first step of one magnitude, against the gradient's sign.
    embed = np.asarray(updates["embed"])
    np.testing.assert_allclose(np.abs(embed), np.abs(embed).max(), rtol=1e-3)  # eps
    assert np.all(np.sign(embed) == -np.sign(np.asarray(GRADS["embed"])))


def test_adafactor_keeps_factored_moments_and_trains():
    tx = _build("adafactor", "optimizer.lr=0.01")
    state = tx.init(PARAMS)
    # One second moment, factored (a row and a column) where both sides are >= 128.
    assert state[0].v_row["proj"].shape == (128,) and state[0].v_col["proj"].shape == (160,)
    assert gj.memory.optimizer_state_bytes(state) < 0.2 * gj.memory.adamw_state_bytes(PARAMS)

    def loss(p):
        return sum(jnp.sum(jnp.tanh(x) ** 2) for x in jax.tree.leaves(p))

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    params, first = PARAMS, float(loss(PARAMS))
    for _ in range(10):
        params, state = step(params, state)
    assert float(loss(params)) < first


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_8_bit_moments_are_refused_by_name(name):
    with pytest.raises(ConfigError, match=f"optimizer.adam.bits=8 .* not {name}"):
        _build(name, "optimizer.adam.bits=8")

"""Master weights in their users' loops: nnx.Optimizer on a bf16 model, train.py.
(The library's own tests, tests/galore_jax, need only the package.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_runs import GALORE, losses, run_train

import galore_jax as gj

BF16 = jnp.bfloat16
MASTER = ["model.param_dtype=bfloat16", "optimizer.master_dtype=float32", "optimizer.lr=0.003"]


class _Mixer(nnx.Module):
    """A user's bf16 model, named unlike ours."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(12, 32, param_dtype=BF16, dtype=BF16, rngs=rngs)
        self.out = nnx.Linear(32, 4, param_dtype=BF16, dtype=BF16, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.inp(x)))


def test_nnx_optimizer_with_a_bf16_model():
    model = _Mixer(nnx.Rngs(0))
    tx = gj.with_master_weights(gj.galore_adamw(3e-3, rank=4, update_proj_gap=3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 12)).astype(BF16)
    y = jnp.sin(x[:, :4].astype(jnp.float32))

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: jnp.mean((m(x).astype(jnp.float32) - y) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0] and np.all(np.isfinite(losses))
    assert model.inp.kernel[...].dtype == BF16


@pytest.mark.slow  # three train.py runs; resume exactness of the default path is in test_train.py
def test_train_py_bf16_with_master_resumes_exactly(tmp_path):
    """train.py with bf16 params and a float32 master: trains, stops, resumes to the
    uninterrupted run bit for bit (the master is in the checkpoint), and saving the
    checkpoint keeps the master in float32."""
    from train_runs import checkpoint_arrays

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(whole, "steps=8", *GALORE, *MASTER)
    first = run_train(parts, "steps=8", "stop_after=4", *GALORE, *MASTER)
    assert "stopped after step 4" in first.stdout
    assert "resumed from step 4" in run_train(parts, "steps=8", *GALORE, *MASTER).stdout
    assert losses(parts) == losses(whole)
    trained = losses(whole)
    assert trained[8] < trained[1]
    params = checkpoint_arrays(whole, 8)
    state = checkpoint_arrays(whole, 8, "opt_state")
    assert {a.dtype for a in params} == {np.dtype(BF16)}
    # Every param has its float32 master among the state's arrays, equal once rounded.
    masters = [a for a in state if a.dtype == np.float32]
    for p in params:
        assert any(m.shape == p.shape and np.array_equal(m.astype(BF16), p) for m in masters)
    for a, b in zip(checkpoint_arrays(parts, 8, "opt_state"), state):
        np.testing.assert_array_equal(a, b)
    # A run without the master cannot silently take this checkpoint.
    clash = run_train(parts, "steps=10", *GALORE, "model.param_dtype=bfloat16", check=False)
    assert clash.returncode != 0 and "optimizer.master_dtype" in clash.stdout + clash.stderr

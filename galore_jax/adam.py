"""Adam with PyTorch's epsilon placement, for reproducing galore-torch exactly.

optax.scale_by_adam divides the bias-corrected moments, m_hat / (sqrt(v_hat) + eps);
torch.optim.AdamW (and galore-torch's GaLoreAdamW) add eps to the uncorrected
root: sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). The two agree for small
eps and differ early in training at large eps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByTorchAdamState(NamedTuple):
    count: jax.Array  # shape=(), dtype=jnp.int32.
    mu: optax.Updates
    nu: optax.Updates


def scale_by_torch_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """Adam scaling with torch's eps convention (complex-safe: nu tracks |g|^2).

    Example:
      >>> import jax.numpy as jnp
      >>> import galore_jax as gj
      >>> tx = gj.scale_by_torch_adam(eps=1e-2)
      >>> u, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
      >>> round(float(u["w"][0]), 4)  # sqrt(1-b2)/(1-b1) * 0.1 / (sqrt(0.001) + 0.01)
      0.7597
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaleByTorchAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(
            lambda v, g: b2 * v + (1 - b2) * (jnp.abs(g) ** 2).astype(v.dtype), state.nu, updates
        )
        count = state.count + 1
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(
            lambda m, v: (step * m / (jnp.sqrt(jnp.real(v)) + eps)).astype(m.dtype), mu, nu
        )
        return out, ScaleByTorchAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)

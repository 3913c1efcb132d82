"""Complex params: JAX's gradient of a real loss, turned into the descent direction.

For a real loss L of a complex param z, `jax.grad` returns conj(dL/dz*) (JAX's
convention for holomorphic-style derivatives), whose conjugate is the steepest
descent direction. An optimizer fed the raw gradient steps along a mirrored
direction: the real part descends, the imaginary part ascends, and training
stalls (FNO spectral weights are complex). Chain `conjugate_complex_grads()`
first to feed optax, and the (Tensor-)GaLore transforms, what they expect.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from galore_jax import paths

__all__ = ["conjugate_complex_grads", "check_complex_grads"]


def check_complex_grads(updates, params, *, where: str) -> None:
    """A clear error for a real gradient of a complex param (its imaginary part would
    never be updated). Checked on dtypes when traced; nothing runs on device."""
    if params is None:
        return
    names, grads, _ = paths.leaf_paths(updates)
    for name, g, p in zip(names, grads, jax.tree.leaves(params)):
        if jnp.iscomplexobj(p) and not jnp.iscomplexobj(g):
            raise ValueError(
                f"{where}: param '{name}' is {jnp.result_type(p)} but its gradient is "
                f"{jnp.result_type(g)}: the imaginary part would never be updated. "
                "Differentiate with respect to the complex param itself (jax.grad keeps its "
                "dtype), not with respect to its real part"
            )


def conjugate_complex_grads() -> optax.GradientTransformation:
    """Conjugates the gradients of complex params (real ones pass unchanged).

    `jax.grad` of a real loss with respect to a complex param z returns the
    conjugate of the steepest-descent direction, so an optimizer must see its
    conjugate: put this first in the chain. Do not also conjugate by hand (twice
    is the raw gradient again). With params passed to `update`, a real gradient
    of a complex param is a clear error.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> w = jnp.array([1.0 + 1.0j])
      >>> loss = lambda w: jnp.sum(jnp.abs(w) ** 2)
      >>> tx = optax.chain(gj.conjugate_complex_grads(), optax.sgd(0.25))
      >>> g = jax.grad(loss)(w)
      >>> updates, _ = tx.update(g, tx.init(w), w)
      >>> w + updates  # halfway to the minimum at 0, real and imaginary part alike
      Array([0.5+0.5j], dtype=complex64)

    References:
      JAX FAQ, gradients of complex functions:
      https://docs.jax.dev/en/latest/notebooks/autodiff_cookbook.html
    """

    def update_fn(updates, state, params=None):
        check_complex_grads(updates, params, where="conjugate_complex_grads")
        conj = lambda g: jnp.conj(g) if jnp.iscomplexobj(g) else g  # noqa: E731
        return jax.tree.map(conj, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)

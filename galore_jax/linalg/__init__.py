"""Linear algebra for subspace refreshes: randomized and exact SVD, HOSVD.

Everything here is jittable with static shapes, works on a leading batch of
matrices (stacked layers), computes in float32 (complex64 for complex input)
whatever the input dtype, and stays valid under Explicit-mode sharding.

The batched randomized path avoids batched QR and SVD, which run as slow loops
on GPU: it orthonormalises with shifted Cholesky-QR (twice) and takes the
ordered top-r basis from `eigh` of a small Gram matrix (Rayleigh-Ritz).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from galore_jax import linalg
  >>> a = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
  >>> u, s, vh = linalg.randomized_svd(a, 4, key=jax.random.PRNGKey(1))
  >>> u.shape, s.shape, vh.shape
  ((64, 4), (4,), (4, 32))
"""

from galore_jax.linalg._qr import canonicalize_signs, orthonormalize
from galore_jax.linalg._svd import (
    check_eigh_available,
    exact_svd,
    randomized_range,
    randomized_svd,
    top_left_basis,
)
from galore_jax.linalg._tucker import (
    hosvd,
    mode_fold,
    mode_product,
    mode_unfold,
    tucker_project,
    tucker_reconstruct,
)

__all__ = [
    "check_eigh_available",
    "canonicalize_signs",
    "exact_svd",
    "hosvd",
    "mode_fold",
    "mode_product",
    "mode_unfold",
    "orthonormalize",
    "randomized_range",
    "randomized_svd",
    "top_left_basis",
    "tucker_project",
    "tucker_reconstruct",
]

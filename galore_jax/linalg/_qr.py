"""Orthonormalisation: shifted Cholesky-QR (batched, sharding-safe), sign-canonical bases,
random completion of dead directions."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops


def compute_dtype(dtype) -> jnp.dtype:
    """float32 / complex64 at least (bf16 and f16 are refreshed in float32)."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.promote_types(dtype, jnp.complex64)
    return jnp.promote_types(dtype, jnp.float32)


def _per_matrix_on_cpu(fn: Callable, *operands: jax.Array):
    """`fn(*operands)`, run one matrix at a time on CPU when there is a batch.

    jaxlib 0.10 - 0.11.0's CPU LAPACK kernels (cholesky, triangular solve, eigh,
    svd, ...) split a batch of matrices over XLA:CPU's intra-op thread pool and
    block until the pieces are done. When every pool thread is itself inside
    such a kernel -- one per device with 8 virtual CPU devices, whose refreshes
    start together after an all-reduce -- nobody is left to run the pieces and
    the program deadlocks (for eigh: batch * 5 k^3 >= 2e5 FLOP, e.g. 4 stacked
    layers at rank 16 + oversample 8). A kernel given one matrix never splits,
    so on CPU the batch is walked with `lax.map` (later jaxlib builds stopped
    splitting too, jax commit 859992407d). Other platforms keep the batched call.
    The platform is picked when lowering (`lax.platform_dependent`). With one
    local device the pool always has a free thread, so the batched call stays.
    """
    batch = operands[0].shape[:-2]
    if math.prod(batch) <= 1 or jax.local_device_count() <= 1:
        return fn(*operands)

    def per_matrix(*ops):
        flat = [x.reshape((-1,) + x.shape[len(batch) :]) for x in ops]
        out = jax.lax.map(lambda xs: fn(*xs), flat)
        return jax.tree.map(lambda y: y.reshape(batch + y.shape[1:]), out)

    return jax.lax.platform_dependent(*operands, cpu=per_matrix, default=fn)


def _inverse_cholesky(gram: jax.Array) -> jax.Array:
    """L^{-1} for the Cholesky factor L of a (batch of) positive definite matrices."""
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    chol = jnp.linalg.cholesky(gram)
    return jax.scipy.linalg.solve_triangular(chol, jnp.broadcast_to(eye, chol.shape), lower=True)


def canonicalize_signs(basis: jax.Array) -> jax.Array:
    """Flips each column so its largest-magnitude entry is real and positive.

    Ties go to the first index. For complex bases the column is multiplied by the
    conjugate phase of that entry. GaLore keeps moments across refreshes, so
    without a fixed sign the trajectory would depend on the SVD backend.

    Args:
      basis: (..., m, r) array whose columns are basis vectors.

    Returns:
      The basis with canonical column signs (same shape and dtype).
    """
    magnitude = jnp.abs(basis)
    pivot_index = jnp.argmax(magnitude, axis=-2)  # first index on ties
    rows = jnp.arange(basis.shape[-2])[:, None]
    is_pivot = rows == pivot_index[..., None, :]
    pivot = jnp.sum(jnp.where(is_pivot, basis, 0), axis=-2)
    pivot_abs = jnp.abs(pivot)
    phase = jnp.where(pivot_abs > 0, pivot / jnp.where(pivot_abs > 0, pivot_abs, 1), 1)
    return basis * jnp.conj(phase)[..., None, :].astype(basis.dtype)


def _gram(y: jax.Array) -> jax.Array:
    return sops.einsum("...mk,...ml->...kl", jnp.conj(y), y)


def orthonormalize(y: jax.Array, *, passes: int = 2, key: Optional[jax.Array] = None) -> jax.Array:
    """Orthonormal basis of the columns of `y` by shifted Cholesky-QR.

    Each pass forms the small Gram matrix, shifts it by a multiple of machine
    epsilon times its trace (so rank-deficient or badly conditioned input never
    makes Cholesky fail), and multiplies `y` by the inverse triangular factor.
    The second pass restores orthogonality to working precision. Columns in
    directions where `y` has (numerically) no energy come out as zeros rather
    than NaN; with a `key` they are filled with random unit directions
    orthogonal to every other column instead, so the result is always a full
    orthonormal basis (zero or rank-deficient `y` included).

    Args:
      y: (..., m, k) array, k <= m.
      passes: number of Cholesky-QR passes.
      key: PRNG key to complete the basis where `y` has no energy (or None).

    Returns:
      (..., m, k) array whose nonzero columns are orthonormal and span range(y);
      all k columns are orthonormal when `key` is given.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import galore_jax as gj
      >>> q = gj.orthonormalize(jnp.zeros((6, 3)), key=jax.random.PRNGKey(0))
      >>> bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5))
      True
    """
    return _orthonormalize([y], passes=passes, keys=None if key is None else [key])[0]


def _orthonormalize(ys: list, *, passes: int = 2, keys: Optional[list] = None) -> list:
    """`orthonormalize` of a group of blocks of one width and dtype: every Cholesky
    factorisation of a pass is one batched call for the whole group."""
    for i in range(passes):
        ys = _cholesky_qr_pass(ys, first=i == 0)
    # The shifts shrink every column by about shift/2; undo that uniform shrink,
    # leaving (near-)zero columns of rank-deficient input alone.
    lives = []
    for j, y in enumerate(ys):
        norms = jnp.sqrt(jnp.sum(jnp.real(jnp.conj(y) * y), axis=-2, keepdims=True))
        live = norms > 0.5
        ys[j] = jnp.where(live, y / jnp.where(live, norms, 1).astype(y.dtype), 0)
        lives.append(live)
    if keys is None:
        return ys
    # The completion costs two more factorisations; skip it when every column is live
    # (the usual case: a gradient with energy in all k directions).
    all_live = functools.reduce(jnp.logical_and, [jnp.all(live) for live in lives])
    return jax.lax.cond(
        all_live,
        lambda ys, keys: ys,
        lambda ys, keys: _fill_dead_columns(ys, lives, keys),
        ys,
        keys,
    )


def _between_products(ys: list, passes: int) -> list:
    """Conditions a group of blocks between two products of the range finder.

    Two passes (the default) orthonormalise them to working precision. One pass
    is half the factorisations and keeps the span, but squares the block's
    condition number: directions weaker than about sqrt(eps * k) times the
    strongest lose accuracy. Columns are left as they come out (no dead-column
    zeroing): weak directions keep their small length for the next product.
    """
    if passes >= 2:
        return _orthonormalize(ys, passes=passes)
    return _cholesky_qr_pass(ys, first=True)


def _cholesky_qr_pass(ys: list, *, first: bool) -> list:
    """One shifted Cholesky-QR pass on each block: y L^{-H} for the Cholesky factor L of
    y^H y + shift, the factors of the whole group in one batched call."""
    grams = []
    for y in ys:
        k = y.shape[-1]
        real_dtype = y.real.dtype
        gram = _gram(y)
        trace = jnp.real(jnp.trace(gram, axis1=-2, axis2=-1))[..., None, None]
        # A generous shift on the first pass survives any conditioning; later passes
        # see a near-identity Gram and only need a shift that keeps rank-deficient
        # input finite.
        shift = jnp.finfo(real_dtype).eps * ((k + 1) if first else 1) * trace
        shift = shift + jnp.finfo(real_dtype).tiny
        grams.append(gram + shift * jnp.eye(k, dtype=y.dtype))
    inv_lowers = _factorise_together(_inverse_cholesky, grams)
    # y = Q L^H  =>  Q = y L^{-H}; the k x k factor is replicated, y keeps its sharding.
    return [
        sops.einsum("...mk,...kl->...ml", y, sops.swap_last(inv)) for y, inv in zip(ys, inv_lowers)
    ]


def _factorise_together(fn: Callable, mats: list) -> list:
    """`fn` (a factorisation of a batch of k x k matrices) on each of `mats` as one
    call: the batches are stacked, factorised together and split back, so a group
    of leaves costs one solver call per step instead of one per leaf."""
    if len(mats) == 1:
        return [_per_matrix_on_cpu(fn, mats[0])]
    batches = [x.shape[:-2] for x in mats]
    flat = jnp.concatenate([sops.replicate(x).reshape((-1,) + x.shape[-2:]) for x in mats], axis=0)
    out = _per_matrix_on_cpu(fn, flat)
    bounds = list(itertools.accumulate(math.prod(b) for b in batches))
    pieces = []
    for batch, lo, hi in zip(batches, [0] + bounds[:-1], bounds):
        pieces.append(jax.tree.map(lambda y: y[lo:hi].reshape(batch + y.shape[1:]), out))
    return pieces


def _fill_dead_columns(qs: list, lives: list, keys: list) -> list:
    """Replaces the zero columns of each `q` by random orthonormal directions orthogonal
    to the rest.

    Each `q`'s live columns are orthonormal; `live` is (..., 1, k). A Gaussian
    block is kept only in the dead columns, projected off the live ones twice
    (twice is enough for orthogonality) and orthonormalised among itself. A block
    without dead columns comes back unchanged.
    """
    zs = []
    for q, live, key in zip(qs, lives, keys):
        z = _gaussian(key, q.shape, q.dtype)
        z = sops.match_sharding(jnp.where(live, 0, z), q)
        for _ in range(2):
            z = z - sops.einsum("...mk,...kl->...ml", q, _cross(q, z))
        zs.append(z)
    zs = _orthonormalize(zs)
    return [jnp.where(live, q, z) for q, live, z in zip(qs, lives, zs)]


def _cross(a: jax.Array, b: jax.Array) -> jax.Array:
    """Replicated a^H b (k x l) of two (..., m, k), (..., m, l) blocks."""
    return sops.replicate(sops.einsum("...mk,...ml->...kl", jnp.conj(a), b))


def _gaussian(key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
    """A Gaussian (m, n) block, broadcast over leading batch axes of `shape`.

    One block per key shared by a stack of matrices: a matrix's sketch depends on
    its own data and the key only, so layer l of a stacked (L, m, n) leaf gets the
    sketch its (m, n) slice gets alone (what `galore_jax.layerwise` relies on).
    """
    *batch, m, n = shape
    return jnp.broadcast_to(_gaussian_block(key, (m, n), dtype), (*batch, m, n))


def _gaussian_block(key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
    if jnp.issubdtype(dtype, jnp.complexfloating):
        real_dtype = jnp.finfo(dtype).dtype
        re_key, im_key = jax.random.split(key)
        scale = jnp.sqrt(jnp.asarray(0.5, real_dtype))
        return (
            jax.random.normal(re_key, shape, real_dtype) * scale
            + 1j * jax.random.normal(im_key, shape, real_dtype) * scale
        ).astype(dtype)
    return jax.random.normal(key, shape, dtype)

"""Linear algebra for subspace refreshes: randomized and exact SVD, HOSVD.

Everything here is jittable with static shapes, works on a leading batch of
matrices (stacked layers), computes in float32 (complex64 for complex input)
whatever the input dtype, and stays valid under Explicit-mode sharding.

The batched randomized path avoids batched QR and SVD, which run as slow loops
on GPU: it orthonormalises with shifted Cholesky-QR (twice) and takes the
ordered top-r basis from `eigh` of a small Gram matrix (Rayleigh-Ritz).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops

__all__ = [
    "canonicalize_signs",
    "orthonormalize",
    "randomized_range",
    "randomized_svd",
    "exact_svd",
    "top_left_basis",
    "mode_unfold",
    "mode_fold",
    "mode_product",
    "tucker_project",
    "tucker_reconstruct",
    "hosvd",
]


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


def _sketch_width(rank: int, oversample: int, m: int, n: int) -> int:
    return max(min(rank + oversample, m, n), rank)


def randomized_range(
    a: jax.Array,
    width: int,
    *,
    key: jax.Array,
    power_iters: int = 1,
    init: Optional[jax.Array] = None,
    intermediate_passes: int = 2,
) -> jax.Array:
    """Orthonormal (..., m, width) basis approximating the dominant range of `a`.

    Halko-Martinsson-Tropp range finder with `power_iters` power (subspace)
    iterations, re-orthonormalised after every product (`intermediate_passes`
    Cholesky-QR passes for the blocks between products, two for the final one;
    see `randomized_svd`). The basis is always
    complete: where `a` has no energy (zero or rank-deficient input) its columns
    are random orthonormal directions, never zeros. With `init` (a previous
    (..., m, r) basis, r <= width) the start block is `a^H init` topped up with
    Gaussian columns: one step of subspace iteration from the old basis, which
    converges in fewer power iterations when the subspace moves slowly.
    """
    inits = None if init is None else [init]
    return _randomized_range(
        [a],
        width,
        keys=[key],
        power_iters=power_iters,
        inits=inits,
        intermediate_passes=intermediate_passes,
    )[0]


def _randomized_range(
    mats: list,
    width: int,
    *,
    keys: list,
    power_iters: int,
    inits,
    intermediate_passes: int,
    valid: Optional[list] = None,
) -> list:
    """`randomized_range` of a group of matrices (one width, dtype and warm-block width),
    each orthonormalisation step factorised for the whole group at once.

    `valid` (one boolean scalar per matrix, or None): a matrix whose flag is False is
    treated as the zero matrix. Its products are zeroed, not the matrix itself, so no
    full-size masked copy is made (it would stay alive across the group's shared
    factorisations, one per matrix: a second gradient tree in a whole-model refresh).
    """
    valid = [None] * len(mats) if valid is None else valid
    a_hs = [sops.swap_last(a) for a in mats]

    def times(xs, ys, spec):
        return [_zero_unless(v, sops.einsum(spec, x, y)) for x, y, v in zip(xs, ys, valid)]

    if inits is None:
        omegas = [
            _gaussian(k, (*a.shape[:-2], a.shape[-1], width), a.dtype) for a, k in zip(mats, keys)
        ]
    else:
        inits = [x.astype(a.dtype) for x, a in zip(inits, mats)]
        omegas = times(a_hs, inits, "...nm,...mr->...nr")
        if width > inits[0].shape[-1]:
            # Bring the warm block to the Gaussian block's column scale before mixing.
            omegas = _between_products(omegas, intermediate_passes)
            for j, (a, key, omega) in enumerate(zip(mats, keys, omegas)):
                n, batch = a.shape[-1], a.shape[:-2]
                omega = omega * jnp.sqrt(jnp.asarray(n, a.real.dtype))
                extra = _gaussian(key, (*batch, n, width - inits[j].shape[-1]), a.dtype)
                extra = sops.match_sharding(extra.astype(omega.dtype), omega)
                omegas[j] = jnp.concatenate([omega, extra], axis=-1)
    fill_keys = [jax.random.fold_in(key, 1) for key in keys]
    if power_iters == 0:
        return _orthonormalize(times(mats, omegas, "...mn,...nk->...mk"), keys=fill_keys)
    qs = _between_products(times(mats, omegas, "...mn,...nk->...mk"), intermediate_passes)
    for i in range(power_iters):
        zs = _between_products(times(a_hs, qs, "...nm,...mk->...nk"), intermediate_passes)
        ys = times(mats, zs, "...mn,...nk->...mk")
        last = i == power_iters - 1
        qs = (
            _orthonormalize(ys, keys=fill_keys)
            if last
            else _between_products(ys, intermediate_passes)
        )
    return qs


def _zero_unless(valid, x: jax.Array) -> jax.Array:
    """x, or zeros where the scalar `valid` is False (None: always x)."""
    return x if valid is None else jnp.where(valid, x, jnp.zeros_like(x))


def randomized_svd(
    a: jax.Array,
    rank: int,
    *,
    key: jax.Array,
    oversample: int = 8,
    power_iters: int = 1,
    init: Optional[jax.Array] = None,
    canonical_signs: bool = True,
    intermediate_passes: int = 2,
    eigh_implementation: Optional[str] = None,
):
    """Truncated SVD by randomized range finding plus Rayleigh-Ritz.

    Args:
      a: (..., m, n) matrix or batch of matrices (any float or complex dtype).
      rank: number of singular triplets to return (<= min(m, n)).
      key: PRNG key for the Gaussian test matrix.
      oversample: extra sketch columns beyond `rank`.
      power_iters: power iterations (each costs two passes over `a`).
      init: optional previous (..., m, r) left basis to warm-start from.
      canonical_signs: flip each left vector so its largest entry is positive
        (right vectors follow, so `u @ diag(s) @ vt` is unchanged).
      intermediate_passes: Cholesky-QR passes for the blocks between products
        (the final block always gets two). 2 keeps every direction accurate to
        float32 rounding; 1 costs half those factorisations (3 instead of 6 per
        matrix at `power_iters=1`, 4 instead of 8 with `init`) and keeps the
        leading directions, but directions weaker than about sqrt(eps * k) of
        the strongest (k = rank + oversample) lose accuracy.
      eigh_implementation: the Rayleigh-Ritz `eigh`'s algorithm: None (the
        backend's: LAPACK on CPU, cuSOLVER syevd on GPU beyond 32 x 32), "qr"
        or "jacobi" (GPU / TPU only; cuSOLVER syevj on GPU), as
        `jax.lax.linalg.EighImplementation` names them.

    Returns:
      `(u, s, vt)` with shapes (..., m, rank), (..., rank), (..., rank, n), in
      float32 / complex64, singular values in descending order.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import galore_jax as gj
      >>> a = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
      >>> u, s, vt = gj.randomized_svd(a, 4, key=jax.random.PRNGKey(1), power_iters=2)
      >>> u.shape, s.shape, vt.shape
      ((64, 4), (4,), (4, 32))
    """
    m, n = a.shape[-2], a.shape[-1]
    _check_rank(rank, m, n)
    a = a.astype(compute_dtype(a.dtype))
    ((q, b, evals, evecs),) = _rayleigh_ritz(
        [(a, rank, key, init)],
        _sketch_width(rank, oversample, m, n),
        power_iters=power_iters,
        intermediate_passes=intermediate_passes,
        eigh=_eigh(eigh_implementation),
    )
    s = jnp.sqrt(jnp.maximum(evals, 0))
    u = sops.einsum("...mk,...kr->...mr", q, evecs)
    vt = sops.einsum("...kr,...kn->...rn", jnp.conj(evecs), b)
    safe_s = jnp.where(s > 0, s, 1)
    vt = vt / safe_s[..., :, None].astype(vt.dtype)
    if canonical_signs:
        u, vt = _canonical_pair(u, vt)
    return u, s, vt


def _canonical_pair(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Canonical signs on u's columns, undone on vt's rows (u @ diag(s) @ vt unchanged)."""
    u_canon = canonicalize_signs(u)
    phase = _column_phase(u, u_canon)
    return u_canon, vt * jnp.conj(phase)[..., :, None]


def _column_phase(before: jax.Array, after: jax.Array) -> jax.Array:
    """Per-column unit factor c with after = before * c (c = +-1 or a phase)."""
    num = jnp.sum(jnp.conj(before) * after, axis=-2)
    den = jnp.sum(jnp.conj(before) * before, axis=-2)
    c = num / jnp.where(jnp.abs(den) > 0, den, 1)
    return jnp.where(jnp.abs(c) > 0, c / jnp.where(jnp.abs(c) > 0, jnp.abs(c), 1), 1)


def exact_svd(a: jax.Array, rank: int, *, canonical_signs: bool = True):
    """Truncated exact SVD in float32/complex64 with canonical signs.

    Returns `(u, s, vt)` like `randomized_svd`. Under Explicit sharding the
    matrix dims are gathered first (dense SVD refuses sharded operands).
    """
    m, n = a.shape[-2], a.shape[-1]
    _check_rank(rank, m, n)
    a = sops.replicate_matrix_dims(a.astype(compute_dtype(a.dtype)))
    u, s, vt = _per_matrix_on_cpu(lambda x: jnp.linalg.svd(x, full_matrices=False), a)
    u, s, vt = u[..., :, :rank], s[..., :rank], vt[..., :rank, :]
    if canonical_signs:
        u, vt = _canonical_pair(u, vt)
    return u, s, vt


def top_left_basis(
    a: jax.Array,
    rank: int,
    *,
    svd: str = "randomized",
    key: Optional[jax.Array] = None,
    oversample: int = 8,
    power_iters: int = 1,
    init: Optional[jax.Array] = None,
    intermediate_passes: int = 2,
    eigh_implementation: Optional[str] = None,
) -> jax.Array:
    """Sign-canonical (..., m, rank) basis of the top-`rank` left singular vectors.

    The randomized path skips the right vectors and singular values it would
    otherwise compute: only the Rayleigh-Ritz eigenvectors are needed. Options
    as in `randomized_svd`.
    """
    return top_left_bases(
        [(a, rank, key, init)],
        svd=svd,
        oversample=oversample,
        power_iters=power_iters,
        intermediate_passes=intermediate_passes,
        eigh_implementation=eigh_implementation,
    )[0]


def top_left_bases(
    tasks: Sequence[tuple],
    *,
    svd: str = "randomized",
    oversample: int = 8,
    power_iters: int = 1,
    intermediate_passes: int = 2,
    eigh_implementation: Optional[str] = None,
    valid: Optional[Sequence[jax.Array]] = None,
) -> list:
    """`top_left_basis` of several matrices: `tasks` are `(a, rank, key, init)`.

    Randomized: matrices whose sketches have one width, warm-start width and
    dtype form a group whose factorisations run as one batched call per step
    (Cholesky of every block's Gram, `eigh` of every Rayleigh-Ritz Gram), so a
    model's refresh costs a few solver calls per step instead of a few per leaf.
    Each matrix gets the basis it gets alone (its own key; stacking only changes
    which call factorises its small matrices).

    `valid` (optional, one boolean scalar per task): where False, the matrix is
    refreshed as if it were zero (a random orthonormal basis), e.g. for a gradient
    that is not finite. The randomized path zeroes the small products instead of
    copying the matrix, so a group's refresh reads the matrices in place.
    """
    if svd not in ("randomized", "exact"):
        raise ValueError(f"svd must be 'randomized' or 'exact', got {svd!r}")
    eigh = _eigh(eigh_implementation) if svd == "randomized" else None
    tasks = [(a.astype(compute_dtype(a.dtype)), rank, key, init) for a, rank, key, init in tasks]
    valid = [None] * len(tasks) if valid is None else list(valid)
    out = [None] * len(tasks)
    groups = {}
    for i, (a, rank, key, init) in enumerate(tasks):
        m, n = a.shape[-2], a.shape[-1]
        _check_rank(rank, m, n)
        if svd == "exact":
            u = _per_matrix_on_cpu(
                lambda x: jnp.linalg.svd(x, full_matrices=False)[0],
                sops.replicate_matrix_dims(_zero_unless(valid[i], a)),
            )[..., :, :rank]
            out[i] = canonicalize_signs(u)
            continue
        if key is None:
            raise ValueError("top_left_basis(svd='randomized') needs a PRNG `key`")
        width = _sketch_width(rank, oversample, m, n)
        warm_width = None if init is None else init.shape[-1]
        groups.setdefault((width, warm_width, jnp.dtype(a.dtype)), []).append(i)
    for (width, _, _), members in groups.items():
        ritz = _rayleigh_ritz(
            [tasks[i] for i in members],
            width,
            power_iters=power_iters,
            intermediate_passes=intermediate_passes,
            eigh=eigh,
            valid=[valid[i] for i in members],
        )
        for i, (q, _, _, evecs) in zip(members, ritz):
            out[i] = canonicalize_signs(sops.einsum("...mk,...kr->...mr", q, evecs))
    return out


def _rayleigh_ritz(tasks, width, *, power_iters, intermediate_passes, eigh, valid=None):
    """Per task `(a, rank, key, init)` of one group (sketches `width` wide): sketch basis
    Q, B = Q^H a, and the top-`rank` eigenpairs of B B^H (descending).

    The k x k Gram is reduced across shards and factorised replicated: cheap, and
    `eigh` of it replaces the batched SVD/QR that are slow on GPU.
    """
    mats, ranks, keys, inits = (list(x) for x in zip(*tasks))
    qs = _randomized_range(
        mats,
        width,
        keys=keys,
        power_iters=power_iters,
        inits=None if inits[0] is None else inits,
        intermediate_passes=intermediate_passes,
        valid=valid,
    )
    valid = [None] * len(mats) if valid is None else valid
    bs = [
        _zero_unless(v, sops.einsum("...mk,...mn->...kn", jnp.conj(q), a))
        for q, a, v in zip(qs, mats, valid)
    ]
    grams = [sops.replicate(sops.einsum("...kn,...ln->...kl", b, jnp.conj(b))) for b in bs]
    eig = _factorise_together(eigh, grams)
    return [
        (q, b, jnp.flip(evals, axis=-1)[..., :rank], jnp.flip(evecs, axis=-1)[..., :rank])
        for q, b, (evals, evecs), rank in zip(qs, bs, eig, ranks)
    ]


EIGH_IMPLEMENTATIONS = (None, "qr", "jacobi")
# Where XLA has each algorithm (jax.lax.linalg.eigh's lowering refuses the others).
_EIGH_BACKENDS = {"qr": ("cpu", "gpu", "cuda", "rocm"), "jacobi": ("gpu", "cuda", "rocm", "tpu")}


def check_eigh_implementation(value, name: str = "eigh_implementation") -> None:
    """A clear error for a value `jax.lax.linalg.eigh` has no algorithm for."""
    if value not in EIGH_IMPLEMENTATIONS:
        raise ValueError(
            f"{name} must be one of {EIGH_IMPLEMENTATIONS} (None: the backend's default), "
            f"got {value!r}"
        )


def check_eigh_available(implementation: Optional[str]) -> None:
    """A clear error when the default backend has no such eigh (e.g. Jacobi on CPU)."""
    check_eigh_implementation(implementation)
    if implementation is None:
        return
    backend = jax.default_backend()
    if backend not in _EIGH_BACKENDS[implementation]:
        raise ValueError(
            f"eigh_implementation={implementation!r} is not available on {backend} "
            f"(XLA has it on {', '.join(sorted(_EIGH_BACKENDS[implementation]))}): "
            "use eigh_implementation=None"
        )


def _eigh(implementation: Optional[str]) -> Callable:
    """`(evals, evecs)` of a batch of Hermitian matrices with this algorithm; None is
    `jnp.linalg.eigh` (the backend's choice)."""
    check_eigh_available(implementation)
    if implementation is None:
        return jnp.linalg.eigh
    algorithm = jax.lax.linalg.EighImplementation(implementation)

    def eigh(x):
        evecs, evals = jax.lax.linalg.eigh(x, implementation=algorithm)
        return evals, evecs

    return eigh


def _check_rank(rank: int, m: int, n: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > min(m, n):
        raise ValueError(f"rank={rank} exceeds min(m, n)={min(m, n)} for a {m}x{n} matrix")


# ----------------------------------------------------------------------------
# Tensors: mode unfolding, mode products, Tucker / HOSVD.
# ----------------------------------------------------------------------------


def mode_unfold(t: jax.Array, mode: int) -> jax.Array:
    """Mode-`mode` unfolding: (d_mode, prod of the other dims), other dims in order."""
    return jnp.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def mode_fold(matrix: jax.Array, mode: int, shape: Sequence[int]) -> jax.Array:
    """Inverse of `mode_unfold` for a tensor of the given shape."""
    moved = (shape[mode],) + tuple(d for i, d in enumerate(shape) if i != mode)
    return jnp.moveaxis(matrix.reshape(moved), 0, mode)


def mode_product(t: jax.Array, matrix: jax.Array, mode: int) -> jax.Array:
    """Mode-`mode` product t x_mode matrix: contracts t's axis `mode` with matrix's columns.

    `matrix` has shape (new_dim, t.shape[mode]); the result has new_dim at `mode`.
    """
    out = jnp.tensordot(matrix, t, axes=([1], [mode]))
    return jnp.moveaxis(out, 0, mode)


def tucker_project(t: jax.Array, factors: Sequence[Optional[jax.Array]]) -> jax.Array:
    """Core = t x_k U_k^H for every mode k whose factor is not None."""
    core = t
    for mode, factor in enumerate(factors):
        if factor is not None:
            core = mode_product(core, jnp.conj(factor).T.astype(core.dtype), mode)
    return core


def tucker_reconstruct(core: jax.Array, factors: Sequence[Optional[jax.Array]]) -> jax.Array:
    """t = core x_k U_k for every mode k whose factor is not None."""
    t = core
    for mode, factor in enumerate(factors):
        if factor is not None:
            t = mode_product(t, factor.astype(t.dtype), mode)
    return t


def hosvd(
    t: jax.Array,
    ranks: Union[int, Sequence[Optional[int]]],
    *,
    key: Optional[jax.Array] = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 1,
    init: Optional[Sequence[Optional[jax.Array]]] = None,
):
    """Truncated higher-order SVD (Tucker decomposition) of a real or complex tensor.

    Factor k holds the top `ranks[k]` left singular vectors of the mode-k
    unfolding (sign-canonical); the core is `t` projected on all factors with
    conjugate transposes. A rank of None leaves that mode unprojected.

    Args:
      t: N-D array (float or complex).
      ranks: one int for every mode, or a per-mode sequence of int or None.
      key: PRNG key (needed for svd="randomized").
      svd: "exact" or "randomized" per-mode SVD.
      oversample, power_iters: randomized range-finder settings.
      init: previous factors (per mode, or None) to warm-start the randomized path.

    Returns:
      `(core, factors)`: core of shape (r_0, ..., r_{N-1}) and a list of
      (d_k, r_k) factors (None for unprojected modes), float32 / complex64.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import galore_jax as gj
      >>> t = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 4))
      >>> core, factors = gj.hosvd(t, (3, 2, 2))
      >>> core.shape, [f.shape for f in factors]
      ((3, 2, 2), [(6, 3), (5, 2), (4, 2)])
    """
    if isinstance(ranks, int):
        ranks = (ranks,) * t.ndim
    ranks = tuple(ranks)
    if len(ranks) != t.ndim:
        raise ValueError(f"ranks has {len(ranks)} entries but the tensor has {t.ndim} modes")
    t = sops.replicate(t.astype(compute_dtype(t.dtype)))
    keys = jax.random.split(key, t.ndim) if key is not None else [None] * t.ndim
    factors = []
    for mode, r in enumerate(ranks):
        if r is None:
            factors.append(None)
            continue
        unfolding = mode_unfold(t, mode)
        if r > unfolding.shape[0]:
            raise ValueError(f"ranks[{mode}]={r} exceeds the mode's size {unfolding.shape[0]}")
        if r > unfolding.shape[1]:
            raise ValueError(
                f"ranks[{mode}]={r} exceeds the product of the other modes {unfolding.shape[1]}"
            )
        prev = None if init is None else init[mode]
        factors.append(
            top_left_basis(
                unfolding,
                r,
                svd=svd,
                key=keys[mode],
                oversample=oversample,
                power_iters=power_iters,
                init=prev,
            )
        )
    return tucker_project(t, factors), factors

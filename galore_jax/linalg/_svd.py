"""Randomized (range finder + Rayleigh-Ritz) and exact truncated SVD, batched."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops
from galore_jax.linalg import _stages
from galore_jax.linalg._qr import (
    _per_matrix_on_cpu,
    canonicalize_signs,
    compute_dtype,
)


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
    inits = [None] * len(mats) if inits is None else inits
    tasks = [
        _stages.Task(a.shape, a.dtype, width, key, init) for a, key, init in zip(mats, keys, inits)
    ]
    finder = _stages.RangeFinder(
        tasks,
        lambda t: width,
        power_iters=power_iters,
        intermediate_passes=intermediate_passes,
    )
    return [c.q for c in _stages.run_dense(finder, mats, valid)]


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


def range_finder(
    tasks: Sequence[_stages.Task],
    *,
    oversample: int = 8,
    power_iters: int = 1,
    intermediate_passes: int = 2,
    eigh_implementation: Optional[str] = None,
) -> _stages.RangeFinder:
    """`top_left_bases`' randomized path as stages, for a driver that cannot hold the
    matrices (`galore_jax.subspace`); `canonical_bases` turns its result into bases."""
    for t in tasks:
        _check_rank(t.rank, *t.shape[-2:])
    return _stages.RangeFinder(
        list(tasks),
        lambda t: _sketch_width(t.rank, oversample, *t.shape[-2:]),
        power_iters=power_iters,
        intermediate_passes=intermediate_passes,
        eigh=_eigh(eigh_implementation),
        keep_b=False,
    )


def canonical_bases(finder: _stages.RangeFinder, carries: list) -> list:
    """The sign-canonical top-rank bases (what `top_left_bases` returns) of final carries."""
    return [canonicalize_signs(finder.basis(c)) for c in carries]


def _rayleigh_ritz(tasks, width, *, power_iters, intermediate_passes, eigh, valid=None):
    """Per task `(a, rank, key, init)` of one group (sketches `width` wide): sketch basis
    Q, B = Q^H a, and the top-`rank` eigenpairs of B B^H (descending).

    The k x k Gram is reduced across shards and factorised replicated: cheap, and
    `eigh` of it replaces the batched SVD/QR that are slow on GPU.
    """
    mats = [a for a, _, _, _ in tasks]
    finder = _stages.RangeFinder(
        [_stages.Task(a.shape, a.dtype, rank, key, init) for a, rank, key, init in tasks],
        lambda t: width,
        power_iters=power_iters,
        intermediate_passes=intermediate_passes,
        eigh=eigh,
    )
    return [(c.q, c.b, c.evals, c.evecs) for c in _stages.run_dense(finder, mats, valid)]


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

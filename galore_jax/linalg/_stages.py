"""The randomized range finder and its Rayleigh-Ritz step as a fixed list of stages.

Every product with the matrix `a` is `a @ x` (RIGHT) or `a^H @ x` (ADJOINT); between
two products only small blocks are factorised. Written as stages, the same arithmetic
runs on a matrix held in memory (`run_dense`) and on one that is only ever seen as a
sum of parts, one pass over the parts per stage (`galore_jax.subspace`: the
micro-batches' or replicas' gradients, which are never summed at full size).

Every stage's state has one shape from the first stage to the last (`Carry`), so a
driver can run the stages in a loop (`lax.while_loop` + `lax.switch`) and compile
the pass over the parts once.
"""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops
from galore_jax.linalg._qr import (
    _between_products,
    _factorise_together,
    _gaussian,
    _orthonormalize,
)

RIGHT, ADJOINT = 0, 1


class Task(NamedTuple):
    """One matrix to find a basis of: `a`'s shape (..., m, n) and compute dtype, the
    basis' rank, its PRNG key and an optional warm-start basis (..., m, r0)."""

    shape: tuple
    dtype: Any
    rank: int
    key: jax.Array
    init: Optional[jax.Array] = None


class Carry(NamedTuple):
    """A task's state between stages (fixed shapes; w is the sketch width)."""

    probe_n: jax.Array  # (..., n, w): the operand of the next RIGHT product
    q: jax.Array  # (..., m, w): the range basis, the operand of the next ADJOINT product
    b: jax.Array  # (..., w, n): q^H a (kept only where asked: (..., 0, 0) otherwise)
    evals: jax.Array  # (..., rank): top eigenvalues of b b^H, descending
    evecs: jax.Array  # (..., w, rank): their eigenvectors
    valid: jax.Array  # bool scalar: False once a product was not finite (or given False)


class Stage(NamedTuple):
    kind: int  # RIGHT | ADJOINT
    update: Callable  # (carries, products) -> carries
    # The operand field the update writes ("probe_n", "q" or None). An update reads
    # only the products, never the operands, so a driver may keep the two operands in
    # one buffer (the next product needs only one of them).
    writes: Optional[str] = None


class RangeFinder:
    """The stages of `_svd`'s randomized range finder (+ Rayleigh-Ritz) for a group list.

    Tasks are grouped by (width, warm width, dtype): each orthonormalisation and
    `eigh` of a group is one batched call. Stage 0 (the product with the warm-start
    basis) runs only for a warm start: `first_stage(warm)`.
    """

    def __init__(
        self,
        tasks: List[Task],
        width_of: Callable,
        *,
        power_iters: int,
        intermediate_passes: int,
        eigh: Optional[Callable] = None,
        keep_b: bool = True,
    ):
        self.tasks, self.keep_b = tasks, keep_b
        self.widths = [width_of(t) for t in tasks]
        self.groups = {}
        for i, (t, w) in enumerate(zip(tasks, self.widths)):
            warm_width = None if t.init is None else t.init.shape[-1]
            self.groups.setdefault((w, warm_width, jnp.dtype(t.dtype)), []).append(i)
        self.power_iters, self.passes, self.eigh = power_iters, intermediate_passes, eigh
        self.stages = self._build()

    # -- state -----------------------------------------------------------------------

    def initial(self, valid: Optional[list] = None) -> list:
        """Every task's carry before stage 0: the cold Gaussian sketch as the RIGHT
        operand, the warm-start basis (zero-padded to w) as the ADJOINT one (in `q`)."""
        out = []
        for i, (t, w) in enumerate(zip(self.tasks, self.widths)):
            *batch, m, n = t.shape
            omega = _gaussian(t.key, (*batch, n, w), t.dtype)
            q = jnp.zeros((*batch, m, w), t.dtype)
            if t.init is not None:
                init = t.init.astype(t.dtype)
                pad = jnp.zeros((*batch, m, w - init.shape[-1]), t.dtype)
                q = jnp.concatenate([init, sops.match_sharding(pad, init)], axis=-1)
            b_shape = (*batch, w, n) if self.keep_b else (*batch, 0, 0)
            v = jnp.ones([], jnp.bool_) if valid is None or valid[i] is None else valid[i]
            out.append(
                Carry(
                    omega,
                    q,
                    jnp.zeros(b_shape, t.dtype),
                    jnp.zeros((*batch, t.rank), jnp.finfo(t.dtype).dtype),
                    jnp.zeros((*batch, w, t.rank), t.dtype),
                    jnp.asarray(v, jnp.bool_),
                )
            )
        return out

    def first_stage(self, warm):
        """Index of the first stage: 0 (warm start) or 1; `warm` may be traced."""
        return jnp.where(warm, 0, 1) if isinstance(warm, jax.Array) else (0 if warm else 1)

    def basis(self, carry: Carry) -> jax.Array:
        """The (..., m, rank) top-rank basis q @ evecs (signs not canonical)."""
        return sops.einsum("...mk,...kr->...mr", carry.q, carry.evecs)

    # -- stages ----------------------------------------------------------------------

    def _per_group(self, carries, products, fn):
        """fn(group members, [(carry, checked product)]) -> new carries, group by group.

        A product that is not finite makes its task invalid from then on; an invalid
        task's products count as zero (a zero matrix: random directions come out).
        """
        carries = list(carries)
        checked = []
        for c, p in zip(carries, products):
            valid = c.valid & jnp.all(jnp.isfinite(p))
            checked.append((c._replace(valid=valid), jnp.where(valid, p, jnp.zeros_like(p))))
        for (width, warm_width, _), members in self.groups.items():
            news = fn(members, width, warm_width, [checked[i] for i in members])
            for i, new in zip(members, news):
                carries[i] = new
        return carries

    def _fill_keys(self, members):
        return [jax.random.fold_in(self.tasks[i].key, 1) for i in members]

    def _build(self) -> list:
        q_iters, passes = self.power_iters, self.passes

        def warm_sketch(carries, products):
            def fn(members, width, warm_width, pairs):
                if warm_width is None:  # a cold group: stage 0 leaves it alone
                    return [c for c, _ in pairs]
                omegas = [p[..., :warm_width] for _, p in pairs]
                if width > warm_width:
                    # Bring the warm block to the Gaussian block's column scale before mixing.
                    omegas = _between_products(omegas, passes)
                    for j, i in enumerate(members):
                        t = self.tasks[i]
                        *batch, _, n = t.shape
                        omega = omegas[j] * jnp.sqrt(jnp.asarray(n, jnp.finfo(t.dtype).dtype))
                        extra = _gaussian(t.key, (*batch, n, width - warm_width), t.dtype)
                        extra = sops.match_sharding(extra.astype(omega.dtype), omega)
                        omegas[j] = jnp.concatenate([omega, extra], axis=-1)
                return [c._replace(probe_n=o) for (c, _), o in zip(pairs, omegas)]

            return self._per_group(carries, products, fn)

        def range_product(last: bool):
            def stage(carries, products):
                def fn(members, width, warm_width, pairs):
                    ys = [p for _, p in pairs]
                    if last:
                        qs = _orthonormalize(ys, keys=self._fill_keys(members))
                        return [c._replace(q=q) for (c, _), q in zip(pairs, qs)]
                    qs = _between_products(ys, passes)
                    return [c._replace(q=q) for (c, _), q in zip(pairs, qs)]

                return self._per_group(carries, products, fn)

            return stage

        def power_transpose(carries, products):
            def fn(members, width, warm_width, pairs):
                zs = _between_products([p for _, p in pairs], passes)
                return [c._replace(probe_n=z) for (c, _), z in zip(pairs, zs)]

            return self._per_group(carries, products, fn)

        def rayleigh_ritz(carries, products):
            def fn(members, width, warm_width, pairs):
                bs = [sops.swap_last(p) for _, p in pairs]  # q^H a = (a^H q)^H
                grams = [
                    sops.replicate(sops.einsum("...kn,...ln->...kl", b, jnp.conj(b))) for b in bs
                ]
                eig = _factorise_together(self.eigh, grams)
                out = []
                for j, ((c, _), b, (evals, evecs)) in enumerate(zip(pairs, bs, eig)):
                    rank = self.tasks[members[j]].rank
                    evals = jnp.flip(evals, axis=-1)[..., :rank]
                    evecs = jnp.flip(evecs, axis=-1)[..., :rank]
                    b = b if self.keep_b else c.b
                    out.append(c._replace(b=b, evals=evals.astype(c.evals.dtype), evecs=evecs))
                return out

            return self._per_group(carries, products, fn)

        stages = [
            Stage(ADJOINT, warm_sketch, "probe_n"),
            Stage(RIGHT, range_product(q_iters == 0), "q"),
        ]
        for i in range(q_iters):
            stages.append(Stage(ADJOINT, power_transpose, "probe_n"))
            stages.append(Stage(RIGHT, range_product(i == q_iters - 1), "q"))
        if self.eigh is not None:
            stages.append(Stage(ADJOINT, rayleigh_ritz))
        return stages


def product(kind: int, a: jax.Array, carry: Carry) -> jax.Array:
    """The stage's product of one matrix (or one part of a sum) with its operand."""
    if kind == RIGHT:
        return sops.einsum("...mn,...nk->...mk", a, carry.probe_n)
    return sops.einsum("...nm,...mk->...nk", sops.swap_last(a), carry.q)


def run_dense(finder: RangeFinder, mats: list, valid: Optional[list] = None) -> list:
    """Runs every stage on matrices in memory; returns the final carries."""
    warm = finder.tasks[0].init is not None
    carries = finder.initial(valid)
    for stage in finder.stages[finder.first_stage(warm) :]:
        carries = stage.update(carries, [product(stage.kind, a, c) for a, c in zip(mats, carries)])
    return carries

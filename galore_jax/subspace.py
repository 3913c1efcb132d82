"""Gradient accumulation in the subspace: micro-batches are never summed at full size.

GaLore's update reads a projected leaf's gradient only through its projection
`R = P^H G`, which is linear: the sum over micro-batches of `P^H G_i` is `P^H` of
their sum. `accumulate_in_subspace` runs your loss over the micro-batches and keeps,
per projected matrix, only that low-rank sum (r x n instead of m x n); every other
leaf (norms, embeddings, Tucker-projected tensors, Fira's and APOLLO's leaves, whose
updates read the whole gradient) accumulates at full size as before.

A step that refreshes a subspace needs more than the projection. The randomized
refresh (`gj.RandomizedSVD`) reads the gradient only through products `G X` and
`G^H Y`, so each product is one more pass over the micro-batches: with the default
(`power_iters=1`, warm start) a refresh runs 5 product passes before the projection's.
The basis is the one the summed gradient gives, up to float rounding: the path is
exact. An exact-SVD refresh needs the whole gradient and is refused.

The refresh passes hold, per matrix, an operand and a running sum of about
max(m, n) x (rank + 8) values beside a micro-batch's gradient. `refresh_parts` (default
2) splits the projected matrices into that many sets of about equal size whose passes
run one set after another, so only one set's buffers are held: a refresh step makes
1 + 5 x refresh_parts backward passes instead of 1 (at `update_proj_gap=200`, 5% more
backward work on average with 2 parts). Each set's passes run in one `lax.fori_loop`:
the backward pass is compiled once per set and once for the projection pass.

Memory (LLaMA-1B, 4 micro-batches, compiled): 0.99x the step without accumulation
with 2 parts (1.07x with 1), against 1.20x for the full-size sum (docs/results.md).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> import galore_jax as gj
  >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
  >>> def loss_fn(params, batch):
  ...     return jnp.mean((batch @ params["w"] + params["b"]) ** 2)
  >>> tx = gj.galore_adamw(1e-2, rank=4, update_proj_gap=10)
  >>> opt_state = tx.init(params)
  >>> batches = jnp.ones((4, 2, 16))  # 4 micro-batches of 2 rows
  >>> @jax.jit
  ... def step(params, opt_state, batches):
  ...     loss, grads, subspace = gj.accumulate_in_subspace(loss_fn, tx)(
  ...         params, batches, opt_state)
  ...     updates, opt_state = tx.update(grads, opt_state, params, subspace=subspace)
  ...     return optax.apply_updates(params, updates), opt_state, loss
  >>> params, opt_state, loss = step(params, opt_state, batches)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from galore_jax import paths
from galore_jax._low_rank import engines_of, is_empty
from galore_jax._subspace_plan import _EnginePlan, _Refresh, _split

__all__ = ["SubspaceGradients", "accumulate_in_subspace"]


class SubspaceGradients(NamedTuple):
    """What `tx.update(..., subspace=...)` needs besides the gradients (a pytree)."""

    entries: dict  # engine token -> Given

    def scaled(self, factor) -> "SubspaceGradients":
        """The low-rank gradients times `factor` (what scaling the gradients scales)."""
        scale = lambda x: x if is_empty(x) else x * factor.astype(x.dtype)  # noqa: E731
        return SubspaceGradients(
            {
                token: given._replace(low=[scale(x) for x in given.low])
                for token, given in self.entries.items()
            }
        )


def micro_batch_count(batches, who: str) -> int:
    """The size of every batch leaf's leading (micro-batch) axis; one, or an error."""
    counts = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batches)}
    if len(counts) != 1 or None in counts:
        raise ValueError(
            f"{who}: batches need one leading micro-batch axis on every leaf, got sizes "
            f"{sorted(counts, key=str)}"
        )
    (k,) = counts
    return k


def check_refresh_parts(refresh_parts, who: str) -> None:
    if isinstance(refresh_parts, bool) or not isinstance(refresh_parts, int) or refresh_parts < 1:
        raise ValueError(f"{who}: refresh_parts must be an int >= 1, got {refresh_parts!r}")


def subspace_engines(tx, who: str) -> list:
    """The engines of `tx` whose projected gradients can accumulate in the subspace."""
    if not engines_of(tx):
        raise ValueError(
            f"{who}: tx holds no galore_jax low-rank transform; pass the "
            "transformation built by gj.galore_adamw / gj.scale_by_galore (the one whose "
            "update you call)"
        )
    return [
        e for e in engines_of(tx) if not e.full_update and hasattr(e.algorithm, "subspace_refresh")
    ]


def accumulate_in_subspace(
    loss_fn: Callable, tx, *, axis_name=None, refresh_parts: int = 2
) -> Callable:
    """`(params, batches, opt_state) -> (loss, grads, subspace)` over micro-batches.

    Args:
      loss_fn: `(params, batch) -> scalar loss` of one micro-batch.
      tx: the optimizer: a galore_jax transformation or alias (`gj.galore_adamw`,
        `gj.scale_by_galore`, ...), the object whose `update` you call.
      axis_name: None, or the data-parallel mesh axis when called under
        `jax.shard_map` with each replica's micro-batches: every sum is then averaged
        over the replicas there, so they exchange the low-rank sums (and each refresh
        pass's products), never full-size gradients of projected matrices.
      refresh_parts: on a refresh step, the projected matrices' refresh passes run in
        this many parts of about equal size, one part after another: each part's
        range-finder buffers are held alone, at the cost of `refresh_parts` times the
        refresh passes (a part none of whose leaves is due, with `stagger`, runs none).

    Returns:
      A function of `params`, `batches` (every leaf with a leading micro-batch axis)
      and `tx`'s state, returning the mean loss, `grads` (params-shaped: the mean
      gradient, where each projected matrix holds its part in the subspace, P P^H G,
      so norms and clipping see what the optimizer sees) and a `SubspaceGradients`
      to pass as `tx.update(grads, opt_state, params, subspace=subspace)`.
    """
    engines = subspace_engines(tx, "accumulate_in_subspace")
    check_refresh_parts(refresh_parts, "accumulate_in_subspace")
    grad_fn = jax.value_and_grad(loss_fn)

    def run(params, batches, opt_state):
        k = micro_batch_count(batches, "accumulate_in_subspace")
        group = _Group(engines, params, opt_state, refresh_parts)

        # Under shard_map the params are the same on every replica; marked varying,
        # each replica's gradient stays its own (no implicit full-size psum).
        local_params = params
        if axis_name is not None:
            local_params = jax.lax.pcast(params, axis_name, to="varying")

        def gradient_leaves(batch):
            loss, grads = grad_fn(local_params, batch)
            return loss, group.treedef.flatten_up_to(grads)

        def mean_over_micro_batches(terms):
            def add(total, batch):
                return jax.tree.map(jnp.add, total, terms(batch)), None

            first = jax.tree.map(lambda x: x[0], batches)
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(terms, first)
            )
            if axis_name is not None:  # the sums differ between replicas until averaged
                zeros = jax.lax.pcast(zeros, axis_name, to="varying")
            total, _ = jax.lax.scan(add, zeros, batches)
            mean = jax.tree.map(lambda x: x / k, total)
            return mean if axis_name is None else jax.lax.pmean(mean, axis_name)

        refreshed = group.refresh(
            lambda terms: mean_over_micro_batches(lambda b: terms(gradient_leaves(b)[1]))
        )

        def terms(batch):  # the projection pass, in the bases just refreshed
            loss, g = gradient_leaves(batch)
            return loss, group.projection_terms(g, refreshed)

        loss, sums = mean_over_micro_batches(terms)
        return (loss, *group.result(refreshed, sums))

    return run


class _Group:
    """`accumulate_in_subspace`'s work on one optimizer state and the params it updates
    (the whole tree, or one group of a layer-wise step): the projected leaves, this step's
    refresh as stages, and the terms each pass over the micro-batches sums.

    Built from arrays or tracers alike (a layer-wise step builds one per layer slice,
    inside its scans and vmaps); only the methods' results are used.
    """

    def __init__(self, engines, params, opt_state, refresh_parts: int):
        names, _, self.treedef = paths.leaf_paths(params)
        index = {name: i for i, name in enumerate(names)}
        plans = [_EnginePlan.of(e, params, opt_state, index) for e in engines]
        plans = [p for p in plans if p.projected]
        if len(plans) > 1:
            raise ValueError(
                "accumulate_in_subspace: tx holds several GaLore transforms with projected "
                "leaves; one is supported"
            )
        self.num_leaves = len(names)
        self.plan = plans[0] if plans else None
        self.parts = (
            [_Refresh(self.plan, leaves) for leaves in _split(self.plan, refresh_parts)]
            if plans
            else []
        )
        self.in_subspace = set(self.plan.users) if plans else set()
        # One schedule of product kinds for every part (one tx, one set of options).
        kinds = {tuple(st.kind for st in r.finder.stages) for r in self.parts}
        assert len(kinds) <= 1, kinds
        self.stage_kinds = kinds.pop() if kinds else ()  # static, to compare groups
        self.num_stages = len(self.stage_kinds)
        self.kinds = jnp.asarray(self.stage_kinds, jnp.int32)

    # -- the refresh's passes (per part: the projected leaves in `refresh_parts` sets) --

    def refresh_start(self, part: int) -> list:
        return self.parts[part].initial() if part < len(self.parts) else []

    def refresh_terms(self, g: list, compact: list, kind, part: int) -> list:
        """One micro-batch's products for the stage of `kind` (`g`: gradient leaves)."""
        return self.parts[part].products(g, compact, kind) if part < len(self.parts) else []

    def refresh_stage(self, i, compact: list, sums: list, part: int) -> list:
        """Stage `i` on the summed products. A fixed trip count (the compiled step
        states its passes): a cold start (step 0) runs the warm-start pass too but
        keeps nothing of it."""
        if part >= len(self.parts):
            return compact
        r = self.parts[part]
        new = jax.lax.switch(i, r.stage_branches, compact, sums)
        start = r.finder.first_stage(r.warm)
        return jax.tree.map(lambda n, o: jnp.where(i >= start, n, o), new, compact)

    def refresh_finish(self, compact: list, part: int):
        """(new projectors, refreshed flags, skips) of one part's leaves."""
        return self.parts[part].finish(compact) if part < len(self.parts) else ([], [], [])

    def refresh_keep(self, part: int):
        """What `refresh_finish` returns when none of the part's leaves is due: their
        projectors as they are."""
        olds = self.parts[part].olds if part < len(self.parts) else []
        no = [jnp.zeros([], jnp.bool_) for _ in olds]
        return list(olds), no, list(no)

    def projectors(self) -> list:
        """The state's projectors of the projected leaves, in leaf order."""
        return self.merge([self.refresh_keep(p) for p in range(len(self.parts))])[0]

    def part_due(self, part: int):
        """Whether a leaf of `part` refreshes at this step (False: no such part)."""
        return self.parts[part].any_due if part < len(self.parts) else jnp.zeros([], jnp.bool_)

    def _leaf_order(self):
        """(part, position in part) of every projected leaf, in the plan's order."""
        where = {j: (p, k) for p, r in enumerate(self.parts) for k, j in enumerate(r.leaves)}
        return [where[j] for j in sorted(where)]

    def merge(self, results: list):
        """Every part's `refresh_finish` (or `refresh_keep`) as one, in leaf order (no
        parts: empty lists)."""
        return tuple([results[p][field][k] for p, k in self._leaf_order()] for field in range(3))

    def refresh(self, mean_of: Callable):
        """This step's `merge`d refresh, part after part; ``mean_of(terms)`` is the mean
        of ``terms(gradient leaves)`` over the micro-batches (one pass each)."""

        def part(p):
            def run_stages(_):
                def body(i, compact):
                    sums = mean_of(lambda g: self.refresh_terms(g, compact, self.kinds[i], p))
                    return self.refresh_stage(i, compact, sums, p)

                compact = jax.lax.fori_loop(0, self.num_stages, body, self.refresh_start(p))
                return self.refresh_finish(compact, p)

            keep = self.refresh_keep(p)
            return jax.lax.cond(self.part_due(p), run_stages, lambda _: keep, None)

        return self.merge([part(p) for p in range(len(self.parts))])

    # -- the projection pass and the result -----------------------------------------

    def projection_terms(self, g: list, refreshed) -> tuple:
        """One micro-batch's (low-rank gradients in the new bases, every other leaf)."""
        lows = self.plan.project(g, refreshed[0]) if self.plan else []
        return lows, [x for u, x in enumerate(g) if u not in self.in_subspace]

    def result(self, refreshed, sums) -> tuple:
        """(grads, `SubspaceGradients`) from the projection pass's mean terms."""
        lows, full = sums
        expanded = self.plan.expand(lows, refreshed[0]) if self.plan else {}
        full_iter = iter(full)
        leaves = [expanded[u] if u in expanded else next(full_iter) for u in range(self.num_leaves)]
        entries = {self.plan.engine.token: self.plan.given(refreshed, lows)} if self.plan else {}
        return self.treedef.unflatten(leaves), SubspaceGradients(entries)

"""The machinery behind `galore_jax.subspace`: one engine's projected leaves
(`_EnginePlan`), their refresh as product stages over passes (`_Refresh`), and the split
of the projected leaves into `refresh_parts` sets."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from galore_jax import _sharding_ops as sops
from galore_jax._low_rank import _slot_leaves, is_empty, leaf_refresh_key
from galore_jax.linalg import _stages
from galore_jax.linalg._svd import canonical_bases


class Given(NamedTuple):
    """One engine's step, done by `accumulate_in_subspace` (per engine leaf; `()` and
    False where a leaf is not projected)."""

    projectors: list  # the projector slots after this step's refresh
    flags: list  # refreshed at this step
    skips: list  # a due refresh skipped (non-finite gradient)
    low: list  # the mean low-rank gradient in the new basis


class _EnginePlan:
    """One engine's projected leaves: their plans, schedule and where they sit in the params."""

    def __init__(self, engine, state, e_names, e_leaves, e_plans, users):
        self.engine, self.state, self.names = engine, state, e_names
        self.e_leaves, self.e_plans = e_leaves, e_plans
        self.projected = [i for i, p in enumerate(e_plans) if p is not None]
        self.users = [users[i] for i in self.projected]  # params leaf index of each

    @classmethod
    def of(cls, engine, params, opt_state, index):
        state = _engine_state(opt_state, engine)
        e_names, e_leaves, _, e_plans = engine.algorithm.plans(engine.view(params))
        return cls(engine, state, e_names, e_leaves, e_plans, [index[n] for n in e_names])

    # -- the projection pass and the results ----------------------------------------

    def project(self, g, news):
        return [
            self.engine.algorithm.to_low(self.e_plans[i], g[u], new)
            for i, u, new in zip(self.projected, self.users, news)
        ]

    def expand(self, lows, news):
        """params leaf index -> the leaf's gradient in the subspace, P P^H G (full size)."""
        out = {}
        for i, u, low, new in zip(self.projected, self.users, lows, news):
            dtype = jnp.result_type(self.e_leaves[i])
            out[u] = self.engine.algorithm.from_low(self.e_plans[i], low, new, dtype).astype(dtype)
        return out

    def with_projectors(self, opt_state, news):
        """`opt_state` with this engine's projectors of the projected leaves set to `news`
        (per projected leaf, its slots; stacked states alike)."""
        engine, projected = self.engine, self.projected

        def swap(state):
            if not isinstance(state, engine.state_cls):
                return state
            trees = []
            for k, tree in enumerate(tuple(state[2])):
                leaves, treedef = jax.tree.flatten(tree, is_leaf=is_empty)
                for j, i in enumerate(projected):
                    leaves[i] = news[j][k]
                trees.append(treedef.unflatten(leaves))
            return state._replace(**{state._fields[2]: engine.algorithm.pack(tuple(trees))})

        return jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, engine.state_cls))

    def given(self, refreshed, lows) -> Given:
        news, flags, skips = refreshed
        n = len(self.e_plans)
        out = Given(
            [()] * n, [jnp.zeros([], jnp.bool_)] * n, [jnp.zeros([], jnp.bool_)] * n, [()] * n
        )
        for j, i in enumerate(self.projected):
            out.projectors[i], out.flags[i], out.skips[i], out.low[i] = (
                news[j],
                flags[j],
                skips[j],
                lows[j],
            )
        return out


class _Refresh:
    """One engine's refresh at this step, as products with the gradient (see `_stages`)."""

    def __init__(self, plan: _EnginePlan, leaves: list):
        engine, state = plan.engine, plan.state
        schedule, self.algorithm = engine.schedule, engine.algorithm
        self.count = count = state.count
        self.leaves = leaves  # positions in plan.projected
        projected = [plan.projected[j] for j in leaves]
        slots = [_slot_leaves(tree) for tree in tuple(state[2])]
        self.olds = [tuple(slot[i] for slot in slots) for i in projected]
        offsets = schedule.offsets(len(plan.projected))
        self.due = [schedule.due(count, offsets[j]) for j in leaves]
        self.any_due = functools.reduce(jnp.logical_or, self.due)
        self.warm = getattr(schedule.refresh, "warm_start", False) & (count > 0)
        _, step_key = jax.random.split(state.key)
        keys = [leaf_refresh_key(step_key, plan.names[i]) for i in projected]
        self.plans = [plan.e_plans[i] for i in projected]
        self.dtypes = [jnp.result_type(plan.e_leaves[i]) for i in projected]
        self.users = [plan.users[j] for j in leaves]
        self.finder, self.tasks, self.sides = self.algorithm.subspace_refresh(
            self.plans, self.olds, keys=keys, dtypes=self.dtypes
        )

        self.stage_branches = [functools.partial(self._stage, st) for st in self.finder.stages]

    # The range finder's two operands share one (..., max(m, n), w) buffer per task, and
    # a pass sums only its stage's product into one such buffer: less held while the
    # pass's backward runs than two operands and two sums.

    def _rows(self, i):
        *_, m, n = self.finder.tasks[i].shape
        return m, n, max(m, n)

    def _pad(self, x, rows):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows - x.shape[-2]), (0, 0)])

    def initial(self):
        """(operand buffer, rest of the carry) per task: the warm-start basis or the
        cold sketch, whichever the first stage reads."""
        out = []
        for i, c in enumerate(self.finder.initial()):
            m, n, rows = self._rows(i)
            buf = jnp.where(self.warm, self._pad(c.q, rows), self._pad(c.probe_n, rows))
            out.append((buf, c._replace(probe_n=(), q=())))
        return out

    def _carries(self, compact):
        out = []
        for i, (buf, rest) in enumerate(compact):
            m, n, _ = self._rows(i)
            out.append(rest._replace(probe_n=buf[..., :n, :], q=buf[..., :m, :]))
        return out

    def _stage(self, stage, compact, sums):
        products = []
        for i, total in enumerate(sums):
            m, n, _ = self._rows(i)
            products.append(total[..., : m if stage.kind == _stages.RIGHT else n, :])
        news = stage.update(self._carries(compact), products)
        out = []
        for i, (new, (buf, _)) in enumerate(zip(news, compact)):
            if stage.writes is not None:
                buf = self._pad(getattr(new, stage.writes), self._rows(i)[2])
            out.append((buf, new._replace(probe_n=(), q=())))
        return out

    def products(self, g: list, compact: list, kind) -> list:
        """Every task's product of this stage's `kind` with one micro-batch's gradient,
        contracted with the leaf as it is (no transposed or converted full-size copy)."""
        out = []
        for i, (t, (buf, _), st) in enumerate(zip(self.tasks, compact, self.finder.tasks)):
            m, n, rows = self._rows(i)
            a = self.plans[t.leaf].to_standard(g[self.users[t.leaf]])
            times = functools.partial(sops.einsum, preferred_element_type=st.dtype)
            x, y = buf[..., :n, :], buf[..., :m, :]  # RIGHT's and ADJOINT's operands

            # a = g: (g x, g^H y); a = g^H: (g^H x, g y). Only this stage's product is
            # computed (a cond per task).
            def right(a, x, y, adjoint=t.adjoint, rows=rows, times=times):
                if adjoint:
                    return self._pad(times("...mn,...mk->...nk", jnp.conj(a), x), rows)
                return self._pad(times("...mn,...nk->...mk", a, x), rows)

            def adjoint_product(a, x, y, adjoint=t.adjoint, rows=rows, times=times):
                if adjoint:
                    return self._pad(times("...mn,...nk->...mk", a, y), rows)
                return self._pad(times("...mn,...mk->...nk", jnp.conj(a), y), rows)

            out.append(jax.lax.cond(kind == _stages.RIGHT, right, adjoint_product, a, x, y))
        return out

    def flags_and_skips(self, compact: list):
        carries = [rest for _, rest in compact]
        valid = [
            functools.reduce(jnp.logical_and, [carries[j].valid for j in mine])
            for mine in self.sides
        ]
        skips = [d & ~v & (self.count > 0) for d, v in zip(self.due, valid)]
        return [d & ~s for d, s in zip(self.due, skips)], skips

    def finish(self, compact: list):
        """(new projectors, refreshed flags, skips) from the last stage's carries."""
        bases = canonical_bases(self.finder, self._carries(compact))
        news = self.algorithm.subspace_projectors(
            self.plans, self.sides, bases, self.olds, self.dtypes
        )
        flags, skips = self.flags_and_skips(compact)
        news = [
            tuple(o if is_empty(o) else jnp.where(f, p, o) for p, o in zip(new, old))
            for new, old, f in zip(news, self.olds, flags)
        ]
        return news, flags, skips


def _split(plan: _EnginePlan, parts: int) -> list:
    """The projected leaves (positions in `plan.projected`) in at most `parts` sets of
    about equal refresh buffers (max(m, n) rows per matrix), each in tree order."""

    def rows(j):
        shape = jnp.shape(plan.e_leaves[plan.projected[j]])
        if len(shape) < 2:
            return max(1, math.prod(shape))
        return max(shape[-2:]) * math.prod(shape[:-2])

    sets = [[] for _ in range(min(parts, len(plan.projected)))]
    loads = [0] * len(sets)
    for j in sorted(range(len(plan.projected)), key=rows, reverse=True):
        lightest = loads.index(min(loads))
        sets[lightest].append(j)
        loads[lightest] += rows(j)
    return sorted(sorted(s) for s in sets)


def _engine_state(opt_state, engine):
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, engine.state_cls))
        if isinstance(x, engine.state_cls)
    ]
    if len(found) != 1:
        raise ValueError(
            f"accumulate_in_subspace: expected one {engine.state_cls.__name__} in opt_state, "
            f"found {len(found)}; pass the state of the tx given to accumulate_in_subspace"
        )
    # Flax's nnx.Optimizer keeps its state's arrays in Variables: read their values.
    return jax.tree.map(
        lambda x: getattr(x, "value", x), found[0], is_leaf=lambda x: hasattr(x, "value")
    )

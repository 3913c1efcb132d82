"""The engine every low-rank algorithm plugs into (private).

An algorithm (GaLore's matrix projectors, Tensor-GaLore's Tucker factors, ...)
says how a leaf is planned, projected, projected back, refreshed and how its
moments rotate: the `LowRankAlgorithm` protocol. The engine does the rest, the
same for all: the refresh schedule (every `update_proj_gap` steps, staggered or
together, under `lax.switch` so other steps pay nothing), warm starts, skipping
refreshes on non-finite gradients, the base optimizer on the low-rank leaves,
what its moments do on a refresh, and the `grad_scale` / `update_scale` extra
args that keep scalar multiplies in the low-rank space.

An algorithm whose full-size update is not just the projected-back low-rank
one (Fira adds a scaled residual of the raw gradient, APOLLO scales the raw
gradient itself) also defines `leaf_state` and `full_update` (see the
protocol): the engine then keeps one extra per-leaf array tree in the state
(its sixth field) and hands `full_update` the raw gradient, the low-rank
gradient, the base optimizer's low-rank update and its bias-correction factor.
"""

from __future__ import annotations

import functools
import itertools
import weakref
import zlib
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import optax

from galore_jax import _quantization as quantization
from galore_jax import _sharding_ops as sops
from galore_jax import paths
from galore_jax._checks import check_scalar_arg, check_schedule
from galore_jax.options import as_refresh


class Schedule(NamedTuple):
    """When and how every low-rank algorithm refreshes its subspaces (checked)."""

    update_proj_gap: int
    on_refresh: str
    stagger: bool
    refresh: Any  # a galore_jax.options refresh object

    @classmethod
    def checked(cls, update_proj_gap, on_refresh, stagger, svd) -> "Schedule":
        check_schedule(update_proj_gap, on_refresh, stagger)
        return cls(update_proj_gap, on_refresh, stagger, as_refresh(svd))

    def offsets(self, num_projected: int) -> list:
        """Each projected leaf's refresh offset inside the gap (tree order)."""
        return refresh_offsets(num_projected, self.update_proj_gap, self.stagger)

    def due(self, count, offset: int):
        """Whether a leaf refreshing at `offset` inside the gap refreshes at step `count`:
        every leaf at step 0, then at k * gap + offset for k >= 1."""
        gap = self.update_proj_gap
        return (count == 0) | ((count % gap == offset) & (count >= gap))


class LowRankAlgorithm(Protocol):
    """What a low-rank algorithm supplies to `low_rank_transform`.

    A plan is the static description of how one leaf is projected (None: the
    leaf stays in full space and gets the base optimizer as it is). A leaf's
    projectors are a tuple with one entry per state slot (`()` where it has
    none); the state keeps one tree per slot, which `pack` turns into the
    state's projector field.
    """

    num_slots: int

    def plans(self, params: Any) -> tuple:
        """params -> (paths, leaves, treedef, per-leaf plan or None); checks them."""

    def pack(self, slot_trees: tuple) -> Any:
        """One tree per slot -> the state's projector field."""

    def init(self, plan: Any, dtype: Any) -> tuple:
        """The per-slot projector arrays of a leaf before its first refresh."""

    def low_shape(self, plan: Any) -> tuple:
        """Shape of the leaf's low-rank gradient (what the base optimizer sees)."""

    def to_low(self, plan: Any, g: jax.Array, projectors: tuple) -> jax.Array:
        """The low-rank gradient."""

    def from_low(self, plan: Any, low: jax.Array, projectors: tuple, dtype: Any) -> jax.Array:
        """The full-size update from a low-rank one, in `dtype`."""

    def refresh(
        self, plans: list, gs: list, olds: list, *, keys: list, warm: bool, valid: list
    ) -> list:
        """New projectors of the leaves that refresh at one step (they may share
        factorisation calls); a leaf whose `valid` flag is False is refreshed as a
        zero gradient."""

    def rotate(self, plan: Any, moment: jax.Array, old: tuple, new: tuple, *, second: bool):
        """A low-rank moment mapped from the old basis to the new one."""

    # Optional (Fira, APOLLO): both or neither.
    #
    # def leaf_state(self, plan) -> jax.Array:
    #     """The extra per-leaf state of a projected leaf (e.g. a limiter's last norm)."""
    #
    # def full_update(self, plan, g, low_g, low_u, projectors, leaf_state, ctx):
    #     """(full-size update in g's dtype, new leaf_state) of a projected leaf.
    #
    #     g: the raw gradient (grad_scale not applied); low_g: the low-rank gradient
    #     (grad_scale applied, zero if g is not finite); low_u: the base optimizer's
    #     low-rank update; ctx: an `UpdateContext`. The engine's default is
    #     `from_low(ctx.scale * ctx.update_scale * low_u)`."""


class UpdateContext(NamedTuple):
    """The scalars `full_update` gets (None: 1)."""

    scale: Any  # the transform's `scale`
    update_scale: Any  # extra arg: multiplies the final update (e.g. -lr)
    grad_scale: Any  # extra arg: multiplied into the gradients first (e.g. a clip factor)
    bias_correction: Any  # the base optimizer's sqrt(1 - b2^t) / (1 - b1^t) (None: unknown)


# Base optimizers' init functions -> base state -> their Adam bias-correction factor
# sqrt(1 - b2^t) / (1 - b1^t) at the step just taken (what Fira's and APOLLO's
# norm-growth limiter divides out: the packages limit before bias correction).
_BIAS_CORRECTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def register_bias_correction(tx: optax.GradientTransformation, b1: float, b2: float):
    """Records that `tx` is an Adam with `b1`, `b2` and a `count` in its state; returns tx."""

    def factor(state):
        t = jnp.asarray(state.count, jnp.float32)
        return jnp.sqrt(1 - b2**t) / (1 - b1**t)

    _BIAS_CORRECTIONS[tx.init] = factor
    return tx


def bias_correction(base_optimizer, base_state):
    """The registered bias-correction factor of `base_optimizer` after an update, or None."""
    try:
        factor = _BIAS_CORRECTIONS.get(base_optimizer.init)
    except TypeError:  # an unhashable init: not registered
        factor = None
    return None if factor is None else factor(base_state)


class Engine(NamedTuple):
    """A `low_rank_transform` as `galore_jax.subspace` sees it (static parts only)."""

    token: str  # names the engine's entry in a `SubspaceGradients`
    algorithm: Any
    schedule: Schedule
    state_cls: type
    full_update: bool  # the update reads the raw gradient (Fira, APOLLO)
    view: Callable = lambda params: params  # params -> the tree the engine is given


# Transformations' init functions -> the low-rank engines inside them, in state order.
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TOKENS = itertools.count()


def register_engines(tx, engines) -> None:
    """Records that `tx` holds `engines` (an alias registers those of its members)."""
    _ENGINES[tx.init] = tuple(engines)


def engines_of(tx) -> tuple:
    """The low-rank engines `tx` holds (registered by our factories), or ()."""
    try:
        return _ENGINES.get(tx.init, ())
    except TypeError:
        return ()


def low_dtype(dtype):
    """Dtype of low-rank gradients and moments: the param's, but float16 widens to float32.

    float16 cannot hold Adam's second moment (|g|^2 overflows at |g| > 256) nor its
    default eps (1e-8 underflows to 0, giving 0/0); the low-rank state is small.
    """
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def is_empty(x) -> bool:
    return type(x) is tuple and not x  # noqa: E721 (not optax's MaskedNode, also a tuple)


def _slot_leaves(tree) -> list:
    """Leaves of a per-slot tree in param order, `()` placeholders included."""
    return jax.tree.leaves(tree, is_leaf=is_empty)


def leaf_key_data(path: str) -> int:
    """A leaf's PRNG stream id (folded into the step key): a hash of its path.

    By path, not position: a leaf keeps its random sketches when other leaves are
    added or removed, and a sub-tree holding the same paths (one layer's slice, in
    `galore_jax.layerwise`) draws what the whole tree draws.
    """
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def leaf_refresh_key(step_key, path: str):
    """The PRNG key a leaf's refresh draws from at a step (the full-size and the
    subspace paths must draw alike)."""
    return jax.random.fold_in(step_key, leaf_key_data(path))


def refresh_offsets(num_projected: int, gap: int, stagger: bool):
    """Step offset inside the gap at which each projected leaf refreshes (tree order)."""
    if not stagger or num_projected == 0:
        return [0] * num_projected
    return [(i * gap) // num_projected for i in range(num_projected)]


def _map_base_moments(base_state, low_tree, per_leaf: Callable):
    """Applies per_leaf(i, moment, second) to every low-rank moment in base_state.

    A moment of leaf i is any state leaf whose key path ends with leaf i's path
    in the low-rank tree and has its low-rank shape (Adam's mu and nu, momentum
    traces, ...). Leaves under a field named `nu` (or `v`, `exp_avg_sq`) are
    second moments. Paths are compared as strings, so the containers Flax's
    `nnx.State` substitutes for dicts match too. Block-quantized moments
    (`galore_jax._quantization`) are dequantized for `per_leaf` and requantized.
    """
    low_paths = [
        paths.path_string(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(low_tree)[0]
    ]
    low_shapes = [jnp.shape(x) for x in jax.tree.leaves(low_tree)]

    def visit(keypath, leaf):
        names = paths.path_string(keypath).split("/")
        quantized = quantization.as_quantized(leaf)
        shape = quantization.value_shape(quantized)
        for i, (low_path, low_shape) in enumerate(zip(low_paths, low_shapes)):
            suffix = low_path.split("/") if low_path else []
            if shape == low_shape and (not suffix or names[-len(suffix) :] == suffix):
                second = any(n in ("nu", "v", "exp_avg_sq") for n in names)
                if not quantization.is_quantized(quantized):
                    return per_leaf(i, leaf, second)
                kind = quantization.NU_KIND if second else quantization.MU_KIND
                value = quantization.dequantize(quantized, kind=kind)
                return quantization.quantize_like(per_leaf(i, value, second), quantized, kind=kind)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, base_state, is_leaf=quantization.is_quantized)


class GradScaleTransformation(optax.GradientTransformationExtraArgs):
    """An optax transformation whose `update` honours the extra arg `grad_scale`.

    `update(g, state, params, grad_scale=c)` returns what `update(c * g, ...)`
    would (up to rounding), with `c` applied where it is cheapest: to the
    low-rank gradients. `scale_by_galore`, `scale_by_tensor_galore`,
    `galore_adamw` and `tensor_galore_adamw` return one; `gj.layerwise_step`
    then hands its clip factor over instead of scaling full-size gradients.
    Any other transformation (an `optax.chain` around one of these included)
    gets the gradients scaled first, since it may ignore unknown extra args.
    """

    __slots__ = ()


def zero_if_not_finite(x):
    """x, or zeros when any entry of x is NaN / inf (the leaf's step counts as zero)."""
    return jnp.where(jnp.all(jnp.isfinite(x)), x, jnp.zeros_like(x))


def scaled_by(x, factor):
    """`x * factor` in x's dtype (as optax's scale_by_learning_rate); None: x."""
    if factor is None:
        return x
    return x * jnp.asarray(factor, jnp.result_type(x))


def low_rank_transform(
    algorithm: LowRankAlgorithm,
    schedule: Schedule,
    *,
    scale,
    base_optimizer: Optional[optax.GradientTransformation],
    projector_dtype,
    state_cls,
) -> GradScaleTransformation:
    """The optax transformation of a low-rank `algorithm` (see the module docstring).

    `state_cls(count, key, projectors, base_state, skipped_refreshes)` builds the
    state (with a sixth field, the per-leaf `leaf_state` tree, for algorithms that
    define `full_update`); `projector_dtype` (None: the param's) is the dtype of
    new projectors; `base_optimizer` None is `optax.scale_by_adam()`.
    """
    on_refresh = schedule.on_refresh
    warm_start = getattr(schedule.refresh, "warm_start", False)
    seed = schedule.refresh.seed
    base_optimizer = base_optimizer or register_bias_correction(optax.scale_by_adam(), 0.9, 0.999)
    base_optimizer = optax.with_extra_args_support(base_optimizer)
    full_update = getattr(algorithm, "full_update", None)

    def low_rank_tree(leaves, plans, treedef, project):
        low = [
            x if p is None else jnp.zeros(project.low_shape(p), low_dtype(jnp.result_type(x)))
            for x, p in zip(leaves, plans)
        ]
        return treedef.unflatten(low)

    def slot_trees(per_leaf, treedef, n):
        return tuple(treedef.unflatten([leaf[k] for leaf in per_leaf]) for k in range(n))

    def init_fn(params):
        _, leaves, treedef, plans = algorithm.plans(params)
        project, n = algorithm, algorithm.num_slots
        per_leaf = [
            ((),) * n if p is None else project.init(p, projector_dtype or jnp.result_type(x))
            for x, p in zip(leaves, plans)
        ]
        low = low_rank_tree(leaves, plans, treedef, project)
        fields = (
            jnp.zeros([], jnp.int32),
            jax.random.PRNGKey(seed),
            algorithm.pack(slot_trees(per_leaf, treedef, n)),
            base_optimizer.init(low),
            jnp.zeros([], jnp.int32),
        )
        if full_update is None:
            return state_cls(*fields)
        extra = [() if p is None else algorithm.leaf_state(p) for p in plans]
        return state_cls(*fields, treedef.unflatten(extra))

    def update_fn(
        updates,
        state,
        params=None,
        *,
        grad_scale=None,
        update_scale=None,
        subspace=None,
        **extra_args,
    ):
        check_scalar_arg("grad_scale", grad_scale)
        check_scalar_arg("update_scale", update_scale)
        del params
        # Gradients accumulated in the subspace (galore_jax.subspace): this step's
        # refresh is done and the low-rank gradients are given.
        given = None if subspace is None else subspace.entries.get(engine.token)
        names, grads, treedef, plans = algorithm.plans(updates)
        project, n = algorithm, algorithm.num_slots
        slots = [_slot_leaves(tree) for tree in tuple(state[2])]
        old_projectors = [tuple(slot[i] for slot in slots) for i in range(len(grads))]
        count = state.count
        key, step_key = jax.random.split(state.key)
        projected = [i for i, p in enumerate(plans) if p is not None]
        offsets = dict(zip(projected, schedule.offsets(len(projected))))

        # A non-finite gradient never reaches a projector or a moment. A refresh
        # due on one keeps the old basis (only the first, with no basis yet,
        # proceeds, on zeros: a random basis); the low-rank gradient then counts
        # as zero (optax.zero_nans, per leaf: one NaN spreads through the whole
        # projection). The checks read the full gradient on refresh steps only:
        # other steps test the small projection, non-finite iff the gradient is.
        refresh_flags, refreshed = {}, {}
        skipped = state.skipped_refreshes
        if given is not None:
            if full_update is not None:
                raise ValueError("this transform's update reads the full-size gradient")
            for i in projected:
                refreshed[i] = tuple(given.projectors[i])
                refresh_flags[i] = given.flags[i]
                skipped = skipped + given.skips[i].astype(jnp.int32)
        else:
            together = {}  # refresh offset -> the leaves refreshing at it (all, without stagger)
            for i in projected:
                together.setdefault(offsets[i], []).append(i)
            for offset, members in together.items():
                due = schedule.due(count, offset)
                member_plans = [plans[i] for i in members]
                keys = [leaf_refresh_key(step_key, names[i]) for i in members]

                def keep(gs, olds):
                    return list(olds), [jnp.zeros([], jnp.bool_) for _ in olds]

                def refresh(gs, olds, *, warm, plans=member_plans, keys=keys):
                    # A subspace does not change when its gradient is scaled, so the raw
                    # gradients are sketched: a scaled or masked full-size copy per leaf
                    # would stay alive across the shared factorisations (a second gradient
                    # tree). A non-finite gradient (or scale) is refreshed as zero, and so
                    # is one scaled by zero.
                    finite = [jnp.all(jnp.isfinite(g)) for g in gs]
                    valid = finite
                    if grad_scale is not None:
                        finite = [f & jnp.isfinite(grad_scale) for f in finite]
                        valid = [f & (grad_scale != 0) for f in finite]
                    news = project.refresh(plans, gs, olds, keys=keys, warm=warm, valid=valid)
                    skips = [~f & (count > 0) for f in finite]
                    news = [
                        tuple(o if is_empty(o) else jnp.where(skip, o, p) for p, o in zip(new, old))
                        for new, old, skip in zip(news, olds, skips)
                    ]
                    return news, skips

                branches = [keep, functools.partial(refresh, warm=False)]
                branch = due.astype(jnp.int32)
                if warm_start:
                    branches.append(functools.partial(refresh, warm=True))
                    branch = jnp.where(due & (count > 0), 2, branch)
                news, skips = jax.lax.switch(
                    branch,
                    branches,
                    [grads[i] for i in members],
                    [old_projectors[i] for i in members],
                )
                for i, new, skip in zip(members, news, skips):
                    skipped = skipped + skip.astype(jnp.int32)
                    refresh_flags[i] = due & ~skip
                    refreshed[i] = new

        new_projectors, low = [], []
        for i, (g, plan, old) in enumerate(zip(grads, plans, old_projectors)):
            if plan is None:  # full space; a non-finite leaf counts as zero, as below
                new_projectors.append(old)
                low.append(zero_if_not_finite(scaled_by(g, grad_scale)))
                continue
            new = refreshed[i]
            new_projectors.append(new)
            low_g = given.low[i] if given is not None else project.to_low(plan, g, new)
            low_g = low_g.astype(low_dtype(jnp.result_type(g)))
            low_g = scaled_by(low_g, grad_scale)
            low.append(zero_if_not_finite(low_g))

        base_state = state.base_state
        if on_refresh != "keep" and projected:
            base_state = _map_base_moments(
                base_state,
                treedef.unflatten(low),
                lambda i, m, second: _on_refresh_moment(
                    project, i, m, second, plans, refresh_flags, old_projectors, new_projectors
                ),
            )

        low_updates, base_state = base_optimizer.update(
            treedef.unflatten(low), base_state, None, **extra_args
        )
        low_updates = treedef.flatten_up_to(low_updates)
        out_scale = scale if update_scale is None else scale * update_scale
        out = []
        if full_update is not None:
            ctx = UpdateContext(
                scale, update_scale, grad_scale, bias_correction(base_optimizer, base_state)
            )
            leaf_states = _slot_leaves(state[5])
        for i, (g, plan, u, p) in enumerate(zip(grads, plans, low_updates, new_projectors)):
            if plan is None:
                out.append(scaled_by(u, update_scale))
            elif full_update is not None:
                dtype = jnp.result_type(g)
                full, leaf_states[i] = full_update(plan, g, low[i], u, p, leaf_states[i], ctx)
                out.append(full.astype(dtype))
            else:  # scalars commute with the projection: multiply the small array
                low_u = scaled_by(u, out_scale)
                dtype = jnp.result_type(g)
                out.append(project.from_low(plan, low_u, p, dtype).astype(dtype))
        fields = (
            optax.safe_int32_increment(count),
            key,
            algorithm.pack(slot_trees(new_projectors, treedef, n)),
            base_state,
            skipped,
        )
        if full_update is not None:
            fields += (treedef.unflatten(leaf_states),)
        return treedef.unflatten(out), state_cls(*fields)

    def _on_refresh_moment(project, i, moment, second, plans, flags, old, new):
        plan = plans[i]
        if plan is None:
            return moment
        if on_refresh == "reset":
            return jnp.where(flags[i], jnp.zeros_like(moment), moment)
        return jax.lax.cond(
            flags[i],
            lambda m: sops.match_sharding(
                project.rotate(plan, m, old[i], new[i], second=second), m
            ),
            lambda m: m,
            moment,
        )

    tx = GradScaleTransformation(init_fn, update_fn)
    engine = Engine(
        f"engine{next(_TOKENS)}", algorithm, schedule, state_cls, full_update is not None
    )
    register_engines(tx, [engine])
    return tx

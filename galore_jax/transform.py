"""GaLore and Tensor-GaLore as Optax gradient transformations.

Both keep the base optimizer's state (Adam's moments by default) in a low-rank
space: each selected gradient G is projected (R = P^H G, G Q, or a Tucker core),
the base optimizer runs on R, its update is projected back and multiplied by
`scale`. Projectors are refreshed from the gradient every `update_proj_gap`
steps, with a randomized (default) or exact SVD, under `lax.switch` so that
other steps pay nothing for it.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from galore_jax import _sharding_ops as sops
from galore_jax import linalg, paths, quantization
from galore_jax import projection as proj
from galore_jax.projection import DimensionNumbers

__all__ = [
    "MatrixProjectors",
    "ScaleByGaloreState",
    "ScaleByTensorGaloreState",
    "scale_by_galore",
    "scale_by_tensor_galore",
]


class MatrixProjectors(NamedTuple):
    """GaLore's projectors, one tree per side (arrays only, `()` where a leaf has none).

    Kept side by side rather than as a tuple per leaf: Flax's `nnx.Optimizer`
    round-trips states through `nnx.State`, which turns containers nested inside
    a params-shaped tree into dicts; trees of plain arrays survive it.
    """

    left: Any  # per param: U (*batch, m, r) for left / full projection, else ().
    right: Any  # per param: Vh (*batch, r, n) for right / full projection, else ().
    # With projector_bits 8 / 4, left and right hold int8 / packed int4 codes and
    # these the float32 scales (see `galore_jax.quantization.quantize_projector`).
    left_scales: Any = ()
    right_scales: Any = ()


class ScaleByGaloreState(NamedTuple):
    """State of `scale_by_galore` (arrays only: jit, sharding, orbax and nnx just work)."""

    count: jax.Array  # shape=(), dtype=jnp.int32. Updates applied so far.
    key: jax.Array  # shape=(2,), dtype=jnp.uint32. PRNG key for randomized refreshes.
    projectors: MatrixProjectors
    base_state: optax.OptState  # base optimizer state over the low-rank gradients.
    skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32. Refreshes skipped (non-finite grads).


class ScaleByTensorGaloreState(NamedTuple):
    """State of `scale_by_tensor_galore` (arrays only)."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    key: jax.Array  # shape=(2,), dtype=jnp.uint32.
    factors: tuple  # factors[k]: per param, its (d_k, r_k) mode-k factor, or () if none.
    base_state: optax.OptState  # base optimizer state over the Tucker cores.
    skipped_refreshes: jax.Array  # shape=(), dtype=jnp.int32.


# ----------------------------------------------------------------------------
# Argument checking (at construction / init, never inside a trace).
# ----------------------------------------------------------------------------

GALORE_STATIC_ARGS = (
    "rank",
    "update_proj_gap",
    "oversample",
    "power_iters",
    "seed",
    "dimension_numbers",
    "projector_bits",
    "projector_group_size",
    "intermediate_passes",
)
TENSOR_GALORE_STATIC_ARGS = ("rank", "update_proj_gap", "oversample", "power_iters", "seed")
_MAX_GAP = 2**31 - 1  # steps are counted in int32
# Tensor-GaLore's state keeps one factor tree per mode; a fixed count keeps the
# state's structure independent of the params' shapes (optax.tree.map_params).
MAX_TUCKER_MODES = 8


def inject_hint(static_args: Sequence[str]) -> str:
    return f"with optax.inject_hyperparams pass static_args={tuple(static_args)!r}"


def _static_int(
    name: str, value, *, minimum: int, maximum: Optional[int] = None, static_args=GALORE_STATIC_ARGS
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, jax.Array):
            raise TypeError(
                f"{name} must be a static Python int, got a jax.Array; {inject_hint(static_args)}"
            )
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_rank_value(rank, name: str = "rank", static_args=GALORE_STATIC_ARGS):
    """Raises a clear error unless `rank` is a positive int or a fraction in (0, 1]."""
    if isinstance(rank, jax.Array):
        raise TypeError(
            f"{name} must be a static int or float, got a jax.Array; {inject_hint(static_args)}"
        )
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{name} must be an int (> 0) or a float fraction in (0, 1], got {rank!r}")
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"{name} must be a positive int, got {rank}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ValueError(f"{name} as a fraction must be in (0, 1], got {rank}")


def check_bits(name: str, value, choices: Sequence[int], static_args=GALORE_STATIC_ARGS) -> int:
    """Returns the bit width `value` names (None: full precision, 32)."""
    if value is None:
        return 32
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{name} must be a static Python int, got a jax.Array; {inject_hint(static_args)}"
        )
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return int(value)


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_common(
    update_proj_gap, oversample, power_iters, seed, svd, on_refresh, static_args=GALORE_STATIC_ARGS
):
    """Checks the options shared by both transforms (and the aliases)."""
    _static_int(
        "update_proj_gap", update_proj_gap, minimum=1, maximum=_MAX_GAP, static_args=static_args
    )
    _static_int("oversample", oversample, minimum=0, static_args=static_args)
    _static_int("power_iters", power_iters, minimum=0, static_args=static_args)
    _static_int("seed", seed, minimum=0, static_args=static_args)
    _check_choice("svd", svd, proj.SVD_METHODS)
    _check_choice("on_refresh", on_refresh, proj.ON_REFRESH)


def _check_base_optimizer(base_optimizer, transform: str):
    """Refuses base optimizers that need params (they run on low-rank gradients only)."""
    if base_optimizer is None:
        return
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{transform}: base_optimizer must be an optax.GradientTransformation, got "
            f"{base_optimizer!r}"
        )
    probe = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
    try:
        jax.eval_shape(lambda g: base_optimizer.update(g, base_optimizer.init(g), None), probe)
    except ValueError as e:
        if "params" in str(e):
            raise ValueError(
                f"{transform}: base_optimizer needs params (e.g. optax.adamw's weight decay), "
                "but it runs on low-rank gradients and never sees them. Use a params-free base "
                "such as optax.scale_by_adam() and put optax.add_decayed_weights after the "
                "GaLore transform (as gj.galore_adamw does)"
            ) from None
    except Exception:  # pylint: disable=broad-except
        pass  # needs other shapes or extra args: it will tell at its first update


def _check_leaf_dtype(transform: str, path: str, leaf):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{transform}: leaf '{path}' has dtype {dtype}; GaLore needs float or complex leaves. "
            "Keep integer/bool leaves out of the optimizer (optax.masked / optax.partition, or "
            "galore_adamw's labels)."
        )


def _low_dtype(dtype):
    """Dtype of low-rank gradients and moments: the param's, but float16 widens to float32.

    float16 cannot hold Adam's second moment (|g|^2 overflows at |g| > 256) nor its
    default eps (1e-8 underflows to 0, giving 0/0); the low-rank state is small.
    """
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


# ----------------------------------------------------------------------------
# The shared low-rank machinery.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Projection:
    """Per-plan operations; one instance for matrix GaLore, one for Tucker.

    A leaf's projectors are a tuple with one entry per slot (`()` where it has
    none); the state keeps one tree per slot (see `MatrixProjectors`).
    """

    init: Callable  # (plan, dtype) -> per-slot tuple of projector arrays / ()
    low_shape: Callable  # plan -> shape of the low-rank gradient
    to_low: Callable  # (plan, g, projectors) -> low-rank gradient
    from_low: Callable  # (plan, low, projectors, update dtype) -> full gradient
    # (plans, gs, olds, *, keys, warm, valid) -> new projectors per leaf, for leaves
    # that refresh at one step (matrix GaLore shares their factorisation calls);
    # a leaf whose `valid` flag is False is refreshed as a zero gradient.
    refresh: Callable
    rotate: Callable  # (plan, moment, old, new, *, second) -> moment


_SIDES = {"left": ("left",), "right": ("right",), "full": ("left", "right")}
_VECTOR_AXIS = {"left": -2, "right": -1}  # U's columns / Vh's rows are the basis vectors
_SLOTS = MatrixProjectors._fields


def _side_arrays(plan, slots):
    return tuple(p for p in slots if not _is_empty(p))


def _matrix_projection(
    svd, oversample, power_iters, bits, group_size, intermediate_passes, eigh_implementation
) -> _Projection:
    """Matrix GaLore; projectors stored in full precision (bits 32) or int8 / int4 codes."""

    def encode(plan, arrays):
        """The side's projector arrays -> the four `MatrixProjectors` slots."""
        slots = dict.fromkeys(_SLOTS, ())
        for side, p in zip(_SIDES[plan.side], arrays):
            if bits == 32:
                slots[side] = p
            else:
                q = quantization.quantize_projector(
                    p, bits, axis=_VECTOR_AXIS[side], group_size=group_size
                )
                slots[side], slots[side + "_scales"] = q.codes, q.scales
        return tuple(slots[k] for k in _SLOTS)

    def decode(plan, slots, dtype):
        """The four slots -> the side's projector arrays (dequantized to `dtype`)."""
        if bits == 32:
            return _side_arrays(plan, slots)
        out = []
        for side, shape in zip(_SIDES[plan.side], plan.projector_shapes()):
            codes, scales = slots[_SLOTS.index(side)], slots[_SLOTS.index(side + "_scales")]
            out.append(
                quantization.dequantize_projector(
                    quantization.QuantizedProjector(codes, scales),
                    bits,
                    dtype,
                    shape,
                    axis=_VECTOR_AXIS[side],
                )
            )
        return tuple(out)

    def refresh(plans, gs, olds, *, keys, warm, valid):
        news = proj.refresh_projectors_together(
            plans,
            [plan.to_standard(g) for plan, g in zip(plans, gs)],
            [decode(plan, old, jnp.result_type(g)) for plan, g, old in zip(plans, gs, olds)],
            svd=svd,
            keys=keys,
            oversample=oversample,
            power_iters=power_iters,
            warm=warm,
            intermediate_passes=intermediate_passes,
            eigh_implementation=eigh_implementation,
            valid=valid,
        )
        # Codes and scales keep the old ones' shardings, so lax.switch branches agree.
        return [
            tuple(
                p if _is_empty(p) else sops.match_sharding(p, o)
                for p, o in zip(encode(plan, new), old)
            )
            for plan, new, old in zip(plans, news, olds)
        ]

    def rotate(plan, moment, old, new, *, second):
        dtype = linalg.compute_dtype(moment.dtype)
        rotations = proj.rotation(plan, decode(plan, old, dtype), decode(plan, new, dtype))
        return proj.rotate_moment(moment, rotations, second=second)

    return _Projection(
        init=lambda plan, dtype: encode(plan, proj.init_projectors(plan, dtype)),
        low_shape=lambda plan: plan.low_rank_shape(),
        to_low=lambda plan, g, p: proj.project(
            plan, plan.to_standard(g), decode(plan, p, jnp.result_type(g))
        ),
        from_low=lambda plan, low, p, dtype: plan.from_standard(
            proj.project_back(plan, low, decode(plan, p, jnp.result_type(low)), dtype)
        ),
        refresh=refresh,
        rotate=rotate,
    )


def _tucker_projection(svd, oversample, power_iters, num_slots) -> _Projection:
    def slots(plan, factors):
        per_mode = [() if f is None else f for f in plan.expand(tuple(factors))]
        return tuple(per_mode) + ((),) * (num_slots - len(per_mode))

    def refresh(plans, gs, olds, *, keys, warm, valid):
        return [
            slots(
                plan,
                proj.tucker_refresh(
                    plan,
                    jnp.where(v, g, 0),  # the HOSVD's unfoldings copy g anyway
                    _side_arrays(plan, old),
                    svd=svd,
                    key=key,
                    oversample=oversample,
                    power_iters=power_iters,
                    warm=warm,
                ),
            )
            for plan, g, old, key, v in zip(plans, gs, olds, keys, valid)
        ]

    return _Projection(
        init=lambda plan, dtype: slots(plan, [jnp.zeros(s, dtype) for s in plan.factor_shapes()]),
        low_shape=lambda plan: plan.core_shape(),
        to_low=lambda plan, g, p: proj.tucker_project(plan, g, _side_arrays(plan, p)),
        from_low=lambda plan, low, p, dtype: proj.tucker_project_back(
            plan, low, _side_arrays(plan, p)
        ),
        refresh=refresh,
        rotate=lambda plan, m, old, new, *, second: proj.tucker_rotate_moment(
            plan, m, _side_arrays(plan, old), _side_arrays(plan, new), second=second
        ),
    )


def _is_empty(x) -> bool:
    return type(x) is tuple and not x  # noqa: E721 (not optax's MaskedNode, also a tuple)


def _slot_leaves(tree) -> list:
    """Leaves of a per-slot tree in param order, `()` placeholders included."""
    return jax.tree.leaves(tree, is_leaf=_is_empty)


def leaf_key_data(path: str) -> int:
    """A leaf's PRNG stream id (folded into the step key): a hash of its path.

    By path, not position: a leaf keeps its random sketches when other leaves are
    added or removed, and a sub-tree holding the same paths (one layer's slice, in
    `galore_jax.layerwise`) draws what the whole tree draws.
    """
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


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
    (`galore_jax.quantization`) are dequantized for `per_leaf` and requantized.
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


def check_scalar_arg(name: str, value) -> None:
    """`grad_scale` / `update_scale` must be scalars (None: 1), checked when traced."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape == () and dtype is not None and jnp.issubdtype(dtype, jnp.number):
        return
    got = f"an array of shape {shape}" if shape is not None else type(value).__name__
    raise ValueError(f"{name} must be a scalar (a number or a 0-d array), got {got}")


def zero_if_not_finite(x):
    """x, or zeros when any entry of x is NaN / inf (the leaf's step counts as zero)."""
    return jnp.where(jnp.all(jnp.isfinite(x)), x, jnp.zeros_like(x))


def scaled_by(x, factor):
    """`x * factor` in x's dtype (as optax's scale_by_learning_rate); None: x."""
    if factor is None:
        return x
    return x * jnp.asarray(factor, jnp.result_type(x))


def _low_rank_transform(
    *,
    make_plans: Callable,  # params -> (paths, leaves, treedef, plans list with None)
    projection: Callable,  # plans -> _Projection
    num_slots: Callable,  # plans -> number of projector slots
    pack_projectors: Callable,  # tuple of slot trees -> the state's projector field
    update_proj_gap: int,
    scale,
    base_optimizer: optax.GradientTransformation,
    warm_start: bool,
    on_refresh: str,
    stagger: bool,
    projector_dtype,
    seed: int,
    state_cls,
) -> GradScaleTransformation:
    base_optimizer = optax.with_extra_args_support(base_optimizer)

    def low_rank_tree(leaves, plans, treedef, project):
        low = [
            x if p is None else jnp.zeros(project.low_shape(p), _low_dtype(jnp.result_type(x)))
            for x, p in zip(leaves, plans)
        ]
        return treedef.unflatten(low)

    def slot_trees(per_leaf, treedef, n):
        return tuple(treedef.unflatten([leaf[k] for leaf in per_leaf]) for k in range(n))

    def init_fn(params):
        _, leaves, treedef, plans = make_plans(params)
        project, n = projection(plans), num_slots(plans)
        per_leaf = [
            ((),) * n if p is None else project.init(p, projector_dtype or jnp.result_type(x))
            for x, p in zip(leaves, plans)
        ]
        low = low_rank_tree(leaves, plans, treedef, project)
        return state_cls(
            jnp.zeros([], jnp.int32),
            jax.random.PRNGKey(seed),
            pack_projectors(slot_trees(per_leaf, treedef, n)),
            base_optimizer.init(low),
            jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, grad_scale=None, update_scale=None, **extra_args):
        check_scalar_arg("grad_scale", grad_scale)
        check_scalar_arg("update_scale", update_scale)
        del params
        names, grads, treedef, plans = make_plans(updates)
        project, n = projection(plans), num_slots(plans)
        slots = [_slot_leaves(tree) for tree in tuple(state[2])]
        old_projectors = [tuple(slot[i] for slot in slots) for i in range(len(grads))]
        count = state.count
        key, step_key = jax.random.split(state.key)
        projected = [i for i, p in enumerate(plans) if p is not None]
        offsets = dict(zip(projected, refresh_offsets(len(projected), update_proj_gap, stagger)))

        # A non-finite gradient never reaches a projector or a moment. A refresh
        # due on one keeps the old basis (only the first, with no basis yet,
        # proceeds, on zeros: a random basis); the low-rank gradient then counts
        # as zero (optax.zero_nans, per leaf: one NaN spreads through the whole
        # projection). The checks read the full gradient on refresh steps only:
        # other steps test the small projection, non-finite iff the gradient is.
        phase = count % update_proj_gap
        together = {}  # refresh offset -> the leaves refreshing at it (all, without stagger)
        for i in projected:
            together.setdefault(offsets[i], []).append(i)
        refresh_flags, refreshed = {}, {}
        skipped = state.skipped_refreshes
        for offset, members in together.items():
            due = (count == 0) | ((phase == offset) & (count >= update_proj_gap))
            member_plans = [plans[i] for i in members]
            keys = [jax.random.fold_in(step_key, leaf_key_data(names[i])) for i in members]

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
                    tuple(o if _is_empty(o) else jnp.where(skip, o, p) for p, o in zip(new, old))
                    for new, old, skip in zip(news, olds, skips)
                ]
                return news, skips

            branches = [keep, functools.partial(refresh, warm=False)]
            branch = due.astype(jnp.int32)
            if warm_start:
                branches.append(functools.partial(refresh, warm=True))
                branch = jnp.where(due & (count > 0), 2, branch)
            news, skips = jax.lax.switch(
                branch, branches, [grads[i] for i in members], [old_projectors[i] for i in members]
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
            low_g = project.to_low(plan, g, new).astype(_low_dtype(jnp.result_type(g)))
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
        for g, plan, u, p in zip(grads, plans, low_updates, new_projectors):
            if plan is None:
                out.append(scaled_by(u, update_scale))
            else:  # scalars commute with the projection: multiply the small array
                low_u = scaled_by(u, out_scale)
                dtype = jnp.result_type(g)
                out.append(project.from_low(plan, low_u, p, dtype).astype(dtype))
        new_state = state_cls(
            optax.safe_int32_increment(count),
            key,
            pack_projectors(slot_trees(new_projectors, treedef, n)),
            base_state,
            skipped,
        )
        return treedef.unflatten(out), new_state

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

    return GradScaleTransformation(init_fn, update_fn)


def scale_by_galore(
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: str = "randomized",
    oversample: int = 8,
    power_iters: int = 1,
    warm_start: bool = True,
    on_refresh: str = "keep",
    stagger: bool = False,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    dimension_numbers: Union[None, DimensionNumbers, Any, Callable[[Any], Any]] = None,
    projector_dtype: Optional[Any] = None,
    projector_bits: Optional[int] = None,
    projector_group_size: Optional[int] = None,
    intermediate_passes: Optional[int] = None,
    eigh_implementation: Optional[str] = None,
    seed: int = 0,
) -> GradScaleTransformation:
    """GaLore: runs `base_optimizer` on low-rank projections of matrix gradients.

    Every leaf with two matrix axes (plus optional batch axes, see
    `dimension_numbers`) is projected; leaves with fewer than two axes go to the
    base optimizer in full space, unscaled (as galore-torch's non-GaLore group).
    Without `dimension_numbers`, stacked layers are found by structure
    (`galore_jax.projection.infer_dimension_numbers`: a leading axis no feature
    dimension shares): (L, m, n) leaves get L projectors, (L, d) leaves stay in
    full space; other N-D leaves are flattened to (d0, prod(rest)).

    Degenerate gradients: a refresh always yields an orthonormal basis of the
    asked rank (where the gradient has no energy, e.g. zero at step 0 or rank
    deficient, the basis is completed with random orthonormal directions). A
    leaf whose gradient is not finite is treated as zero gradient for that step
    (like `optax.zero_nans`, for the whole leaf), and a refresh due at that step
    keeps the previous basis; `skipped_refreshes` in the state counts them.

    Projection side (fixed per leaf at trace time, galore-torch semantics for an
    m x n gradient): `std` projects on the right (G Vh_r^H, moments m x r) when
    m >= n, else on the left (U_r^H G, moments r x n); `reverse_std` the
    opposite; `left` / `right` forced; `full` both (U_r^H G Vh_r^H, r x r).

    Refresh schedule: every leaf refreshes at step 0 from the first gradient.
    Without `stagger` all leaves then refresh together at steps T, 2T, ...
    With `stagger`, leaf i (among the projected leaves, in tree order) refreshes
    at k*T + offset_i for k >= 1, offsets spread evenly over [0, T), so no single
    step pays for every SVD. Stacked layers of one leaf refresh together.

    `on_refresh` says what happens to the base optimizer's low-rank moments when
    a leaf's subspace changes:
      * "keep" (galore-torch): left as they are, reinterpreted in the new basis.
      * "reset": set to zero (the base optimizer's shared step count, and so its
        bias correction, is not reset).
      * "project": first moments are rotated into the new basis with
        P_new^H P_old (exact for the part of the moment inside both subspaces).
        Second moments are per-coordinate magnitudes that cannot be rotated: they
        are mapped with the elementwise-squared rotation |P_new^H P_old|^2, which
        is exact when the old coordinates are uncorrelated and keeps their scale.

    Extra args of `update` (optax's `GradientTransformationExtraArgs`):
    `grad_scale` and `update_scale`, scalars (None: 1) that multiply the
    gradients before and the updates after, as `optax.scale` stages chained
    before and after would, but in the low-rank space, so no pass over a
    full-size array is added (`galore_adamw` passes its clip factor and
    learning rate through them). A refresh still sees the scaled gradient.

    Args:
      rank: int rank, or float in (0, 1] as a fraction of the projected dim.
      update_proj_gap: steps between subspace refreshes (T).
      scale: multiplies the projected-back update (GaLore's alpha). May be an array.
      proj_type: "std" | "reverse_std" | "left" | "right" | "full".
      svd: "randomized" (GaLore 2 range finder, Cholesky-QR + eigh) or "exact".
      oversample: extra sketch columns for the randomized SVD.
      power_iters: power iterations for the randomized SVD.
      warm_start: start the randomized range finder from the previous basis.
      on_refresh: "keep" | "reset" | "project" (see above).
      stagger: spread the leaves' refreshes over the gap.
      base_optimizer: transformation run on the low-rank gradients; default
        `optax.scale_by_adam()`. It must not need `params` (they are not low-rank).
      dimension_numbers: `DimensionNumbers(batch_axes=...)` for all leaves, a
        pytree matching the params of DimensionNumbers or None, or a callable
        params -> such a pytree. Batch axes (e.g. the layer axis of scanned
        weights of shape (L, m, n)) get independent projectors. None: inferred
        from the structure (see above).
      projector_dtype: dtype to store projectors in (default: the param's).
      projector_bits: None or 32 (full precision), 8 or 4: store projectors as int8 /
        packed int4 codes with float32 absmax scales (Q-GaLore), dequantized on
        use; refreshes write codes directly. Moments' precision is the base
        optimizer's (e.g. `gj.scale_by_adam_8bit()`).
      projector_group_size: None (one scale per basis vector) or the number of
        values per scale along each basis vector (Q-GaLore: 256 with INT4).
      intermediate_passes: Cholesky-QR passes (1, or 2 = None, the default)
        for the randomized range finder's blocks between products; 1 halves
        those factorisations at a cost in the weakest directions' accuracy (see
        `randomized_svd`).
      eigh_implementation: the randomized refresh's Rayleigh-Ritz `eigh`
        algorithm: None (the backend's default), "qr", or "jacobi" (GPU / TPU;
        cuSOLVER syevj on GPU); see `randomized_svd`.
      seed: seed of the PRNG key kept in the state.

    Returns:
      A `GradScaleTransformation` (an `optax.GradientTransformationExtraArgs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
      >>> tx = optax.chain(gj.scale_by_galore(rank=4, update_proj_gap=10), optax.scale(-1e-2))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state)
      >>> updates["w"].shape, state[0].projectors.right["w"].shape  # Vh: rank x n
      ((16, 8), (4, 8))

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024. https://arxiv.org/abs/2403.03507
      Su et al., GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank
      Projection, 2025. https://arxiv.org/abs/2504.20437
    """
    check_rank_value(rank)
    check_common(update_proj_gap, oversample, power_iters, seed, svd, on_refresh)
    _check_choice("proj_type", proj_type, proj.PROJ_TYPES)
    projector_bits = check_bits("projector_bits", projector_bits, (32, 8, 4))
    if projector_group_size is not None:
        _static_int("projector_group_size", projector_group_size, minimum=1)
    # None (not 2) as the default keeps static_args lists written before the option valid.
    intermediate_passes = 2 if intermediate_passes is None else intermediate_passes
    _static_int("intermediate_passes", intermediate_passes, minimum=1, maximum=2)
    linalg.check_eigh_implementation(eigh_implementation)
    if eigh_implementation is not None and svd != "randomized":
        raise ValueError(
            f"eigh_implementation={eigh_implementation!r} applies to svd='randomized' "
            f"(the Rayleigh-Ritz eigh); svd={svd!r} runs an SVD: leave it None"
        )
    _check_base_optimizer(base_optimizer, "scale_by_galore")

    def make_plans(params):
        names, leaves, treedef = paths.leaf_paths(params)
        dims = proj.resolve_dimension_numbers(dimension_numbers, params)
        plans = []
        for path, leaf, d in zip(names, leaves, dims):
            _check_leaf_dtype("scale_by_galore", path, leaf)
            ndim = jnp.ndim(leaf) - (len(d.batch_axes) if d is not None else 0)
            if ndim < 2:
                if d is not None and dimension_numbers is not None:  # inferred: a stacked vector
                    raise ValueError(
                        f"dimension_numbers for '{path}' leave {ndim} matrix axes for a leaf of "
                        f"shape {jnp.shape(leaf)}; exactly 2 must remain"
                    )
                plans.append(None)
            else:
                plans.append(proj.matrix_plan(jnp.shape(leaf), d, proj_type, rank, path))
        return names, leaves, treedef, plans

    return _low_rank_transform(
        make_plans=make_plans,
        projection=lambda plans: _matrix_projection(
            svd,
            oversample,
            power_iters,
            projector_bits,
            projector_group_size,
            intermediate_passes,
            eigh_implementation,
        ),
        num_slots=lambda plans: len(MatrixProjectors._fields),
        pack_projectors=lambda slots: MatrixProjectors(*slots),
        update_proj_gap=update_proj_gap,
        scale=scale,
        base_optimizer=base_optimizer or optax.scale_by_adam(),
        warm_start=warm_start and svd == "randomized",
        on_refresh=on_refresh,
        stagger=stagger,
        projector_dtype=projector_dtype,
        seed=seed,
        state_cls=ScaleByGaloreState,
    )


def scale_by_tensor_galore(
    rank: Union[int, float, Sequence[Union[int, float, None]]] = 0.25,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    modes: Optional[Sequence[int]] = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 1,
    warm_start: bool = True,
    on_refresh: str = "keep",
    stagger: bool = False,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    projector_dtype: Optional[Any] = None,
    seed: int = 0,
) -> GradScaleTransformation:
    """Tensor-GaLore: base optimizer on the Tucker core of N-D gradients.

    For each leaf with >= 2 axes, factor k is the top r_k left singular vectors
    of the gradient's mode-k unfolding (HOSVD, sign-canonical); the base
    optimizer sees the core G x_k U_k^H and its update is mapped back with
    core x_k U_k, times `scale`. Complex leaves (FNO spectral weights) use
    conjugate transposes; the default `optax.scale_by_adam` keeps |g|^2 in its
    second moment for them. `jax.grad` of a real loss returns the conjugate of a
    complex param's descent direction: chain `gj.conjugate_complex_grads()` before
    this transform (training on the raw gradient stalls). Factors are recomputed
    from the current gradient at step 0 and every `update_proj_gap` steps
    (staggered if asked, as in `scale_by_galore`). Leaves with fewer than 2 axes
    get the base optimizer in full space.

    Extra args `grad_scale` and `update_scale`: as in `scale_by_galore`.

    Args:
      rank: an int rank for every projected mode; a float in (0, 1]: the fraction
        of each tensor's entries the Tucker core plus factors hold (tensorly's and
        neuraloperator's meaning; `projection.tucker_ranks_for_fraction`, e.g. 0.25
        on (24, 24, 8, 8) gives (17, 17, 6, 6)); or a per-mode tuple of ints, float
        fractions of that mode, or None (mode unprojected), one entry per mode. A
        tuple of the wrong length or a rank above its mode's size is an error.
      update_proj_gap: steps between refreshes.
      scale: multiplies the projected-back update.
      modes: which modes to project (default: all).
      svd: "exact" or "randomized" per-mode SVD.
      oversample, power_iters, warm_start: randomized SVD settings.
      on_refresh: "keep" | "reset" | "project" (moments rotated mode by mode).
      stagger: spread leaves' refreshes over the gap.
      base_optimizer: default `optax.scale_by_adam()`.
      projector_dtype: dtype of the stored factors (default: the param's).
      seed: PRNG seed.

    Returns:
      A `GradScaleTransformation` (an `optax.GradientTransformationExtraArgs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> w = jnp.ones((8, 8, 4, 4), jnp.complex64)
      >>> tx = gj.scale_by_tensor_galore(rank=0.5, update_proj_gap=50)
      >>> state = tx.init({"w": w})
      >>> [factor["w"].shape for factor in state.factors[:4]]  # one tree per mode
      [(8, 6), (8, 6), (4, 3), (4, 3)]
      >>> state.factors[4]["w"]  # modes a leaf does not have: empty
      ()

    References:
      George et al., Tensor-GaLore: Memory-Efficient Training via Gradient
      Tensor Decomposition, 2025. https://arxiv.org/abs/2501.02379
    """
    static = TENSOR_GALORE_STATIC_ARGS
    if isinstance(rank, (tuple, list)):
        for i, r in enumerate(rank):
            if r is not None:
                check_rank_value(r, f"rank[{i}]", static)
    else:
        check_rank_value(rank, "rank", static)
    check_common(update_proj_gap, oversample, power_iters, seed, svd, on_refresh, static)
    _check_base_optimizer(base_optimizer, "scale_by_tensor_galore")

    def make_plans(params):
        names, leaves, treedef = paths.leaf_paths(params)
        plans = []
        for path, leaf in zip(names, leaves):
            _check_leaf_dtype("scale_by_tensor_galore", path, leaf)
            if jnp.ndim(leaf) < 2:
                plans.append(None)
            elif jnp.ndim(leaf) > MAX_TUCKER_MODES:
                raise ValueError(
                    f"scale_by_tensor_galore: leaf '{path}' has {jnp.ndim(leaf)} modes; at most "
                    f"{MAX_TUCKER_MODES} are supported (reshape it, or label it for plain Adam)"
                )
            else:
                plans.append(proj.tucker_plan(jnp.shape(leaf), rank, modes, path))
        return names, leaves, treedef, plans

    return _low_rank_transform(
        make_plans=make_plans,
        projection=lambda plans: _tucker_projection(svd, oversample, power_iters, MAX_TUCKER_MODES),
        num_slots=lambda plans: MAX_TUCKER_MODES,
        pack_projectors=tuple,
        update_proj_gap=update_proj_gap,
        scale=scale,
        base_optimizer=base_optimizer or optax.scale_by_adam(),
        warm_start=warm_start and svd == "randomized",
        on_refresh=on_refresh,
        stagger=stagger,
        projector_dtype=projector_dtype,
        seed=seed,
        state_cls=ScaleByTensorGaloreState,
    )

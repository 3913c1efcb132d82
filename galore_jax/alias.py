"""Ready-made optimizers: GaLore / Tensor-GaLore + AdamW in one optax chain.

[clip_by_global_norm(max_grad_norm)]                 optional
-> partition(labels -> {galore, tensor_galore, adam})   low-rank or plain Adam scaling
-> add_decayed_weights(weight_decay)                 decoupled decay, full space
-> scale_by_learning_rate(learning_rate)             schedules allowed

The state is that chain's (without the clip, which keeps none), but the update
is fused: the clip factor and the learning rate are scalars that commute with
the projections, so they are applied to the low-rank gradients and updates,
not to full-size arrays (see `_fused_update`).
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from galore_jax import labels as labels_lib
from galore_jax import paths, quantization, transform
from galore_jax import projection as proj
from galore_jax.complex_grads import check_complex_grads
from galore_jax.transform import scale_by_galore, scale_by_tensor_galore

ScalarOrSchedule = Union[float, optax.Schedule]


GALORE_ADAMW_STATIC_ARGS = transform.GALORE_STATIC_ARGS + ("tensor_rank", "moment_bits")


def _adam(b1, b2, eps, mu_dtype, moment_bits):
    """Adam's scaling with 32-bit (optax) or block-wise 8-bit moments."""
    if moment_bits == 8:
        return quantization.scale_by_adam_8bit(b1=b1, b2=b2, eps=eps)
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)


def _check_bits(moment_bits, projector_bits, static_args):
    """Bit widths as ints (None: 32); None defaults keep old static_args lists valid."""
    return (
        transform.check_bits("moment_bits", moment_bits, (32, 8), static_args),
        transform.check_bits("projector_bits", projector_bits, (32, 8, 4), static_args),
    )


def _refresh_options(
    update_proj_gap, scale, oversample, power_iters, warm_start, on_refresh, stagger
):
    """The options both low-rank transforms take alike, as keyword arguments."""
    return dict(
        update_proj_gap=update_proj_gap,
        scale=scale,
        oversample=oversample,
        power_iters=power_iters,
        warm_start=warm_start,
        on_refresh=on_refresh,
        stagger=stagger,
    )


def _decayed_weights(weight_decay, mask, name):
    """optax.add_decayed_weights; a literal 0 is the identity (needs no params), and
    a missing params argument is an error that names `weight_decay`."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return optax.identity()
    inner = optax.add_decayed_weights(weight_decay, mask)

    def update_fn(updates, state, params=None):
        if not jax.tree.leaves(updates):  # an empty tree: nothing to decay
            return updates, state
        if params is None:
            raise ValueError(
                f"{name}(weight_decay={weight_decay!r}) decays the params, so tx.update needs "
                "them: call tx.update(grads, state, params), or set weight_decay=0"
            )
        return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update_fn)


def _check_max_grad_norm(name, max_grad_norm):
    if max_grad_norm is None or isinstance(max_grad_norm, jax.Array):
        return
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"{name}: max_grad_norm must be a float or None, got {max_grad_norm!r}")
    if not max_grad_norm > 0:
        raise ValueError(
            f"{name}: max_grad_norm must be > 0, got {max_grad_norm!r} (None: no clipping)"
        )


def norm_of_finite_leaves(tree) -> tuple[jax.Array, jax.Array]:
    """(global norm over the leaves whose squared norm is finite, how many are not).

    With every leaf finite the norm is optax.tree.norm's value bit for bit; a NaN /
    inf leaf (which `galore_adamw` zeroes for the step) is left out of it.
    """
    sums = [jnp.sum(jnp.square(x.real) + jnp.square(x.imag)) for x in jax.tree.leaves(tree)]
    finite = [jnp.isfinite(s) for s in sums]
    total = functools.reduce(
        operator.add, [jnp.where(f, s, jnp.zeros_like(s)) for f, s in zip(finite, sums)], 0
    )
    nonfinite = functools.reduce(operator.add, [(~f).astype(jnp.int32) for f in finite], 0)
    return jnp.sqrt(jnp.asarray(total)), jnp.asarray(nonfinite)


def _clip_factor(updates, max_norm, grad_scale=None):
    """optax.clip_by_global_norm's factor for `grad_scale * updates`: 1 below
    `max_norm`, else max_norm / norm, the norm taken over the finite leaves (each
    member zeroes a non-finite leaf for the step, so one NaN cannot scale every
    other leaf to NaN)."""
    norm, _ = norm_of_finite_leaves(updates)
    if grad_scale is not None:
        norm = norm * jnp.abs(jnp.asarray(grad_scale, norm.dtype))
    return jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)


def _times(a, b):
    """a * b for optional scalars (None: 1)."""
    return b if a is None else a * b


def _with_scales(inner: optax.GradientTransformation) -> transform.GradScaleTransformation:
    """`inner` (Adam on full-size leaves) that takes the low-rank transforms' extra
    args `grad_scale` / `update_scale`; the multiplies fuse into Adam's own pass.
    A leaf whose gradient is not finite counts as a zero gradient for the step, as
    in the low-rank transforms."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, *, grad_scale=None, update_scale=None, **extra):
        scaled = lambda tree, f: jax.tree.map(lambda x: transform.scaled_by(x, f), tree)
        updates = jax.tree.map(transform.zero_if_not_finite, scaled(updates, grad_scale))
        updates, state = inner.update(updates, state, params, **extra)
        return scaled(updates, update_scale), state

    return transform.GradScaleTransformation(inner.init, update_fn)


def _fused_update(partition, decay, lr_stage, max_grad_norm):
    """The update of chain(clip, partition, decay, scale_by_learning_rate), with the
    clip factor and -lr handed to the partition's members as scalars.

    Per leaf: the member returns -lr * (its update) (low-rank members scale the
    small array before projecting back); the decay then adds wd * (-lr * param),
    which is -lr * (update + wd * param) as in the chain. An extra arg
    `grad_scale` multiplies the gradients before everything (the clip's norm
    included), as an `optax.scale` stage chained first would.
    """

    def update_fn(updates, state, params=None, *, grad_scale=None, **extra_args):
        transform.check_scalar_arg("grad_scale", grad_scale)
        check_complex_grads(updates, params, where="update")
        partition_state, decay_state, lr_state = state
        # The lr stage on a scalar 1: optax's step size (schedule, sign) and count.
        step, lr_state = lr_stage.update(jnp.ones([], jnp.float32), lr_state)
        if max_grad_norm is not None:  # the clip sees grad_scale * updates
            grad_scale = _times(grad_scale, _clip_factor(updates, max_grad_norm, grad_scale))
        updates, partition_state = partition.update(
            updates, partition_state, params, grad_scale=grad_scale, update_scale=step, **extra_args
        )
        decay_params = params
        if params is not None:
            decay_params = jax.tree.map(lambda p: p * jnp.asarray(step, p.dtype), params)
        updates, decay_state = decay.update(updates, decay_state, decay_params)
        return updates, (partition_state, decay_state, lr_state)

    return update_fn


def _chain(
    learning_rate,
    *,
    max_grad_norm,
    labeler,
    b1,
    b2,
    eps,
    mu_dtype,
    moment_bits,
    weight_decay,
    weight_decay_mask,
    galore_tx,
    tensor_tx,
    name,
):
    adam = lambda: _adam(b1, b2, eps, mu_dtype, moment_bits)
    partition = optax.partition(
        {
            labels_lib.GALORE: galore_tx(adam()),
            labels_lib.TENSOR_GALORE: tensor_tx(adam()),
            labels_lib.ADAM: _with_scales(adam()),
        },
        labeler.labels,
    )
    decay = _decayed_weights(weight_decay, weight_decay_mask, name)
    lr_stage = optax.scale_by_learning_rate(learning_rate)
    chain = optax.chain(partition, decay, lr_stage)  # its init: the state tree
    tx = transform.GradScaleTransformation(
        chain.init, _fused_update(partition, decay, lr_stage, max_grad_norm)
    )
    labels_lib.register_explainer(tx.init, labeler.explain)
    return tx


def _no_batch_axes(params):
    return jax.tree.map(lambda _: None, params)


class _Labeler:
    """An optimizer's labels, resolved on the whole params; what GaLore sees by path.

    Stacked layers are found by structure over the whole tree (e.g. a norm stack
    (L, d) beside the kernels (L, m, n)), but `optax.partition` hands the GaLore
    transform only its masked sub-tree. `labels`, which `optax.partition` calls
    on the whole tree first (at init and at every update), records the
    resolution; the transform reads it by param path (`__call__`). The rank
    fallback warning is given once per optimizer, not once per trace.
    """

    def __init__(self, dimension_numbers, given_labels=None, **rule):
        self.dimension_numbers = dimension_numbers
        self.given_labels = given_labels
        self.rule = rule
        self.by_path = {}
        self.warned = False

    def resolve(self, params) -> labels_lib.LabelRule:
        names = paths.leaf_paths(params)[0]
        dims = proj.resolve_dimension_numbers(self.dimension_numbers, params)
        self.by_path = dict(zip(names, dims))
        if self.given_labels is not None:
            given = self.given_labels
            labels = given(params) if paths.is_function(given) else given
            return labels_lib.LabelRule(labels, dict.fromkeys(names, "labels given"), [])
        treedef = jax.tree.structure(params)
        return labels_lib.label_rule(params, dimension_numbers=treedef.unflatten(dims), **self.rule)

    def labels(self, params):
        if self.warned:  # every warning of the rule is said once per optimizer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.resolve(params).labels
        self.warned = True
        rule = self.resolve(params)
        rule.warn_fallbacks(stacklevel=5)
        return rule.labels

    def explain(self, params) -> dict:
        return self.resolve(params).reasons

    def __call__(self, sub_params):
        names, _, treedef = paths.leaf_paths(sub_params)
        if not all(n in self.by_path for n in names):  # not called through the labels
            resolved = proj.resolve_dimension_numbers(self.dimension_numbers, sub_params)
            return treedef.unflatten(resolved)
        return treedef.unflatten([self.by_path[n] for n in names])


def _check_ranks(name, rank, static_args):
    for i, r in enumerate(rank) if isinstance(rank, (tuple, list)) else [(None, rank)]:
        if r is not None or i is None:
            transform.check_rank_value(r, name if i is None else f"{name}[{i}]", static_args)


def galore_adamw(
    learning_rate: ScalarOrSchedule,
    *,
    rank: Union[int, float] = 128,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    moment_bits: Optional[int] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: str = "randomized",
    oversample: int = 8,
    power_iters: int = 1,
    warm_start: bool = True,
    on_refresh: str = "keep",
    stagger: bool = False,
    dimension_numbers: Any = None,
    labels: Optional[Union[Any, Callable[[Any], Any]]] = None,
    label_overrides: labels_lib.Overrides = None,
    tensor_rank: Union[int, float, tuple] = 0.25,
    tensor_svd: str = "exact",
    projector_bits: Optional[int] = None,
    projector_group_size: Optional[int] = None,
    intermediate_passes: Optional[int] = None,
    eigh_implementation: Optional[str] = None,
    seed: int = 0,
) -> transform.GradScaleTransformation:
    """AdamW whose moments for matrices live in GaLore's low-rank subspaces.

    Default labels (see `galore_labels`): 2-D matrices and stacked matrices
    (batch axes in `dimension_numbers`, or found by structure) ->
    `scale_by_galore`; other >= 3-D tensors -> `scale_by_tensor_galore` with
    `tensor_rank`; embeddings, positional tables, output heads, norms, biases,
    vectors and matrices too small for `rank` -> plain Adam. `labels` replaces
    the rule (a pytree of labels or a callable params -> labels);
    `label_overrides` ({regex: label}) patches it by param path.
    `gj.describe(tx, params)` shows what each leaf gets.

    Everything after `learning_rate` is keyword-only (torch's GaLore takes the
    rank second: `galore_adamw(8, 1e-2)` would silently swap lr and rank). With
    `optax.inject_hyperparams`, pass `static_args=gj.GALORE_ADAMW_STATIC_ARGS`.

    Args:
      learning_rate: float or optax schedule.
      rank: GaLore rank (int, or fraction of the projected dim).
      b1, b2, eps, mu_dtype: Adam settings (optax convention for eps).
      moment_bits: None or 32 (full precision), or 8 for block-wise 8-bit Adam
        moments everywhere (low-rank and plain-Adam leaves;
        `gj.scale_by_adam_8bit`, small leaves stay 32-bit).
      weight_decay, weight_decay_mask: decoupled weight decay in full space.
      max_grad_norm: None, or clip the gradients' global norm to this first (as
        `optax.clip_by_global_norm(max_grad_norm)` chained before; the factor,
        like the learning rate, is applied in the low-rank space).
      update_proj_gap, scale, proj_type, svd, oversample, power_iters,
        warm_start, on_refresh, stagger, dimension_numbers, projector_bits,
        projector_group_size, intermediate_passes, eigh_implementation, seed: as
        in `scale_by_galore` (projector_bits, intermediate_passes and
        eigh_implementation apply to matrix GaLore; Tucker factors stay full
        precision, two-pass, default eigh).
      labels, label_overrides: parameter selection (see above).
      tensor_rank, tensor_svd: Tucker rank and SVD for tensor leaves.

    Extra arg of `update`: `grad_scale`, a scalar (None: 1) the gradients are
    multiplied by first, applied in the low-rank space (`gj.layerwise_step`
    passes its clip factor this way).

    Returns:
      A `GradScaleTransformation` (an `optax.GradientTransformationExtraArgs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import galore_jax as gj
      >>> params = {"embed": jnp.zeros((32, 8)), "mlp": jnp.ones((8, 16)), "norm": jnp.ones(8)}
      >>> tx = gj.galore_adamw(1e-2, rank=4, update_proj_gap=100, weight_decay=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    static = GALORE_ADAMW_STATIC_ARGS
    _check_max_grad_norm("galore_adamw", max_grad_norm)
    _check_ranks("rank", rank, static)
    _check_ranks("tensor_rank", tensor_rank, static)
    transform.check_common(update_proj_gap, oversample, power_iters, seed, svd, on_refresh, static)
    moment_bits, projector_bits = _check_bits(moment_bits, projector_bits, static)
    dims = _Labeler(
        dimension_numbers,
        labels,
        label_overrides=label_overrides,
        rank=rank,
        proj_type=proj_type,
        tensor_rank=tensor_rank,
    )
    refresh = _refresh_options(
        update_proj_gap, scale, oversample, power_iters, warm_start, on_refresh, stagger
    )
    galore = lambda base: scale_by_galore(
        rank,
        **refresh,
        proj_type=proj_type,
        svd=svd,
        base_optimizer=base,
        dimension_numbers=dims,
        projector_bits=projector_bits,
        projector_group_size=projector_group_size,
        intermediate_passes=intermediate_passes,
        eigh_implementation=eigh_implementation,
        seed=seed,
    )
    tensor = lambda base: scale_by_tensor_galore(
        tensor_rank, **refresh, svd=tensor_svd, base_optimizer=base, seed=seed + 1
    )
    return _chain(
        learning_rate,
        max_grad_norm=max_grad_norm,
        labeler=dims,
        b1=b1,
        b2=b2,
        eps=eps,
        mu_dtype=mu_dtype,
        moment_bits=moment_bits,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        galore_tx=galore,
        tensor_tx=tensor,
        name="galore_adamw",
    )


def tensor_galore_adamw(
    learning_rate: ScalarOrSchedule,
    *,
    rank: Union[int, float, tuple] = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    moment_bits: Optional[int] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    modes: Optional[tuple] = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 1,
    warm_start: bool = True,
    on_refresh: str = "keep",
    stagger: bool = False,
    labels: Optional[Union[Any, Callable[[Any], Any]]] = None,
    label_overrides: labels_lib.Overrides = None,
    seed: int = 0,
) -> transform.GradScaleTransformation:
    """AdamW with Tensor-GaLore (Tucker) moments for N-D tensors.

    Default labels: >= 3-D tensors (e.g. FNO spectral weights, complex) ->
    `scale_by_tensor_galore`; everything else (2-D pointwise layers, biases,
    norms) -> plain Adam. Override with `labels` / `label_overrides` (e.g.
    {"kernel": "tensor_galore"} to Tucker-project matrices too).
    `max_grad_norm` clips as in `galore_adamw` (the factor in the low-rank space),
    and `update` takes the extra arg `grad_scale` as `galore_adamw`'s does.

    `rank`: as in `scale_by_tensor_galore` (a float is the fraction of each
    tensor's entries kept by its Tucker core plus factors, as in neuraloperator);
    a per-mode tuple that does not fit a tensor is an error naming it.

    Complex params: `jax.grad` of a real loss returns the conjugate of the descent
    direction; use `optax.chain(gj.conjugate_complex_grads(), tx)` (or conjugate
    the gradients yourself, once). A real gradient for a complex param is an error.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import galore_jax as gj
      >>> params = {"spectral": jnp.ones((8, 8, 6, 6), jnp.complex64), "w": jnp.ones((8, 8))}
      >>> tx = gj.tensor_galore_adamw(1e-3, rank=0.25, update_proj_gap=50)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> updates["spectral"].dtype
      dtype('complex64')
    """
    static = transform.TENSOR_GALORE_STATIC_ARGS + ("moment_bits",)
    _check_max_grad_norm("tensor_galore_adamw", max_grad_norm)
    _check_ranks("rank", rank, static)
    moment_bits, _ = _check_bits(moment_bits, None, static)
    transform.check_common(update_proj_gap, oversample, power_iters, seed, svd, on_refresh, static)
    refresh = _refresh_options(
        update_proj_gap, scale, oversample, power_iters, warm_start, on_refresh, stagger
    )
    tensor = lambda base: scale_by_tensor_galore(
        rank, **refresh, modes=modes, svd=svd, base_optimizer=base, seed=seed
    )
    return _chain(
        learning_rate,
        max_grad_norm=max_grad_norm,
        # Every N-D tensor is a tensor here (stacked layers too): no stack inference.
        labeler=_Labeler(
            _no_batch_axes,
            labels,
            label_overrides=label_overrides,
            matrices=labels_lib.ADAM,
            tensor_rank=rank,
        ),
        b1=b1,
        b2=b2,
        eps=eps,
        mu_dtype=mu_dtype,
        moment_bits=moment_bits,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        galore_tx=lambda base: scale_by_galore(
            0.25, update_proj_gap=update_proj_gap, scale=scale, base_optimizer=base, seed=seed
        ),
        tensor_tx=tensor,
        name="tensor_galore_adamw",
    )

"""Ready-made optimizers: GaLore / Tensor-GaLore + AdamW in one optax chain
(`galore_jax._fused`: the clip factor and the learning rate applied in the
low-rank space)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional, Union

import jax
import optax

from galore_jax import _checks, _legacy, paths
from galore_jax import labels as labels_lib
from galore_jax._fused import adamw_chain
from galore_jax._low_rank import GradScaleTransformation
from galore_jax.dimensions import resolve_dimension_numbers
from galore_jax.galore import scale_by_galore
from galore_jax.options import (
    AdamOptions,
    Labels,
    ProjectorStorage,
    RandomizedSVD,
    Refresh,
    Tucker,
    as_refresh,
)
from galore_jax.tensor_galore import scale_by_tensor_galore

ScalarOrSchedule = Union[float, optax.Schedule]
LabelsArg = Union[None, Labels, Any, Callable[[Any], Any]]

# With optax.inject_hyperparams: static_args=GALORE_ADAMW_STATIC_ARGS.
GALORE_ADAMW_STATIC_ARGS = _checks.STATIC_ARGS


def _labels(labels: LabelsArg) -> Labels:
    return labels if isinstance(labels, Labels) else Labels(tree=labels)


def _schedule(update_proj_gap, scale, on_refresh, stagger) -> dict:
    """The keywords both low-rank transforms take alike."""
    return dict(
        update_proj_gap=update_proj_gap, scale=scale, on_refresh=on_refresh, stagger=stagger
    )


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

    def __init__(self, labels: Labels, **rule):
        self.dimension_numbers = labels.dimension_numbers
        self.given_labels = labels.tree
        self.rule = dict(rule, label_overrides=labels.override_dict())
        self.by_path = {}
        self.warned = False

    def resolve(self, params) -> labels_lib.LabelRule:
        names = paths.leaf_paths(params)[0]
        dims = resolve_dimension_numbers(self.dimension_numbers, params)
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
            resolved = resolve_dimension_numbers(self.dimension_numbers, sub_params)
            return treedef.unflatten(resolved)
        return treedef.unflatten([self.by_path[n] for n in names])


_MOVED = dict(
    svd=_legacy.REFRESH_KEYWORDS,
    projector=_legacy.PROJECTOR_KEYWORDS,
    adam=_legacy.ADAM_KEYWORDS,
    labels=_legacy.LABELS_KEYWORDS,
)


@_legacy.moved_keywords(**_MOVED, tensor=_legacy.TUCKER_KEYWORDS)
def galore_adamw(
    learning_rate: ScalarOrSchedule,
    *,
    rank: Union[int, float] = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: Union[str, Refresh] = "randomized",
    projector: Optional[ProjectorStorage] = None,
    on_refresh: str = "keep",
    stagger: bool = False,
    adam: Optional[AdamOptions] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
    labels: LabelsArg = None,
    tensor: Optional[Tucker] = None,
) -> GradScaleTransformation:
    """AdamW whose moments for matrices live in GaLore's low-rank subspaces.

    Default labels (see `galore_labels`): 2-D matrices and stacked matrices
    (batch axes in `dimension_numbers`, or found by structure) ->
    `scale_by_galore`; other >= 3-D tensors -> `scale_by_tensor_galore` with
    `tensor_rank`; embeddings, positional tables, output heads, norms, biases,
    vectors and matrices too small for `rank` -> plain Adam. `labels` replaces
    the rule (a pytree of labels or a callable params -> labels);
    `gj.Labels(overrides={regex: label})` patches it by param path.
    `gj.describe(tx, params)` shows what each leaf gets.

    Everything after `learning_rate` is keyword-only (torch's GaLore takes the
    rank second: `galore_adamw(8, 1e-2)` would silently swap lr and rank). With
    `optax.inject_hyperparams`, pass `static_args=gj.GALORE_ADAMW_STATIC_ARGS`
    (option objects are static by themselves).

    Args:
      learning_rate: float or optax schedule.
      rank: GaLore rank (int, or fraction of the projected dim).
      update_proj_gap, scale, proj_type, on_refresh, stagger: as in
        `scale_by_galore`.
      svd: how matrix subspaces are refreshed: "randomized" | "exact" or
        `gj.RandomizedSVD(...)` / `gj.ExactSVD(...)` (its seed seeds the state's key).
      projector: None or `gj.ProjectorStorage(bits=8 | 4, group_size=...)`
        (matrix projectors; Tucker factors stay full precision).
      adam: `gj.AdamOptions(b1, b2, eps, mu_dtype, bits)` (None: the defaults);
        `bits=8` stores every Adam moment block-wise in 8 bits (low-rank and
        plain-Adam leaves; small leaves stay 32-bit).
      weight_decay, weight_decay_mask: decoupled weight decay in full space.
      max_grad_norm: None, or clip the gradients' global norm to this first (as
        `optax.clip_by_global_norm(max_grad_norm)` chained before; the factor,
        like the learning rate, is applied in the low-rank space).
      labels: None (the rule above), a pytree of labels or a callable params ->
        labels, or `gj.Labels(tree, overrides, dimension_numbers)`: overrides
        ({regex: label}) patch the rule by param path; dimension_numbers name
        stacked-layer axes (None: found by structure).
      tensor: `gj.Tucker(rank, svd, modes)` for the tensors labelled
        "tensor_galore" (None: `gj.Tucker()`, rank 0.25, exact SVD). Their PRNG key
        is seeded with `Tucker.svd.seed + 1`.

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
    _checks.check_max_grad_norm("galore_adamw", max_grad_norm)
    _checks.check_ranks("rank", rank)
    _checks.check_schedule(update_proj_gap, on_refresh, stagger)
    refresh = as_refresh(svd)
    projector = _checks.check_option("projector", projector, ProjectorStorage)
    adam = _checks.check_option("adam", adam, AdamOptions)
    tensor = _checks.check_option("tensor", tensor, Tucker)
    labeler = _Labeler(_labels(labels), rank=rank, proj_type=proj_type, tensor_rank=tensor.rank)
    schedule = _schedule(update_proj_gap, scale, on_refresh, stagger)
    tensor_svd = dataclasses.replace(tensor.svd, seed=tensor.svd.seed + 1)
    return adamw_chain(
        learning_rate,
        max_grad_norm=max_grad_norm,
        labeler=labeler,
        adam_options=adam,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        galore_tx=lambda base: scale_by_galore(
            rank,
            **schedule,
            proj_type=proj_type,
            svd=refresh,
            base_optimizer=base,
            projector=projector,
            dimension_numbers=labeler,
        ),
        tensor_tx=lambda base: scale_by_tensor_galore(
            tensor.rank, **schedule, modes=tensor.modes, svd=tensor_svd, base_optimizer=base
        ),
        name="galore_adamw",
    )


@_legacy.moved_keywords(
    svd=_legacy.REFRESH_KEYWORDS,
    adam=_legacy.ADAM_KEYWORDS,
    labels={"label_overrides": "overrides"},
)
def tensor_galore_adamw(
    learning_rate: ScalarOrSchedule,
    *,
    rank: Union[int, float, tuple] = 0.25,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    modes: Optional[tuple] = None,
    svd: Union[str, Refresh] = "exact",
    on_refresh: str = "keep",
    stagger: bool = False,
    adam: Optional[AdamOptions] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    max_grad_norm: Optional[float] = None,
    labels: LabelsArg = None,
) -> GradScaleTransformation:
    """AdamW with Tensor-GaLore (Tucker) moments for N-D tensors.

    Default labels: >= 3-D tensors (e.g. FNO spectral weights, complex) ->
    `scale_by_tensor_galore`; everything else (2-D pointwise layers, biases,
    norms) -> plain Adam. Override with `labels` (e.g.
    `gj.Labels(overrides={"kernel": "tensor_galore"})` to Tucker-project matrices too).
    `max_grad_norm` clips as in `galore_adamw` (the factor in the low-rank space),
    and `update` takes the extra arg `grad_scale` as `galore_adamw`'s does.

    `rank`, `modes`, `svd`: as in `scale_by_tensor_galore`; `adam`, `labels`: as in
    `galore_adamw`. `rank` (a float is the fraction of each
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
    _checks.check_max_grad_norm("tensor_galore_adamw", max_grad_norm)
    _checks.check_ranks("rank", rank)
    _checks.check_schedule(update_proj_gap, on_refresh, stagger)
    refresh = as_refresh(svd)
    adam = _checks.check_option("adam", adam, AdamOptions)
    labels = _labels(labels)
    # Every N-D tensor is a tensor here (stacked layers too): no stack inference.
    labels = dataclasses.replace(labels, dimension_numbers=_no_batch_axes)
    schedule = _schedule(update_proj_gap, scale, on_refresh, stagger)
    return adamw_chain(
        learning_rate,
        max_grad_norm=max_grad_norm,
        labeler=_Labeler(labels, matrices=labels_lib.ADAM, tensor_rank=rank),
        adam_options=adam,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        galore_tx=lambda base: scale_by_galore(
            0.25,
            update_proj_gap=update_proj_gap,
            scale=scale,
            base_optimizer=base,
            svd=RandomizedSVD(seed=refresh.seed),
        ),
        tensor_tx=lambda base: scale_by_tensor_galore(
            rank, **schedule, modes=modes, svd=refresh, base_optimizer=base
        ),
        name="tensor_galore_adamw",
    )

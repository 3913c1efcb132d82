"""Which parameters get which treatment: GaLore, Tensor-GaLore, or plain Adam.

Labels are strings per leaf, for `optax.partition`:
  "galore"         matrices (2-D), and stacked matrices (L, m, n) whose layer axis
                   is given by dimension numbers or found by structure;
  "tensor_galore"  other N-D tensors (>= 3-D), e.g. FNO spectral weights;
  "adam"           embeddings, positional tables, output heads, norms, biases,
                   vectors (stacked or not), scalars, and matrices too small for
                   the rank to save anything.
The default rule looks at names (`DEFAULT_PLAIN_PATTERN`) and at structure, so
layers named `head`, `pos_emb` or `ln1` are treated like `lm_head`, `wpe` and
`norm`. User overrides are regular expressions searched in the param's path
("layers/attn/q_proj/kernel"); the first matching one decides, and a leaf forced
to a label keeps it (a rank that does not fit is then an error, not a fallback).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax.numpy as jnp

from galore_jax import _closures, _matrix_plan, _tucker_plan, paths
from galore_jax.dimensions import resolve_dimension_numbers

GALORE = "galore"
TENSOR_GALORE = "tensor_galore"
ADAM = "adam"
LABELS = (GALORE, TENSOR_GALORE, ADAM)

# Params that stay in plain Adam by name (searched case-insensitively in the path).
DEFAULT_PLAIN_PATTERN = r"embed|lm_head|wte|wpe|norm|bias"

Overrides = Union[Mapping[str, str], Sequence[Tuple[str, str]], None]


def _normalize_overrides(overrides: Overrides):
    if overrides is None:
        return []
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    compiled = []
    for pattern, label in items:
        if label not in LABELS:
            raise ValueError(
                f"label_overrides maps {pattern!r} to {label!r}; labels are {', '.join(LABELS)}"
            )
        try:
            compiled.append((re.compile(pattern), label))
        except re.error as e:
            raise ValueError(f"label_overrides has an invalid regex {pattern!r}: {e}") from None
    return compiled


def _model_tables(shapes, dims) -> list:
    """Which leaves are embedding / positional / output tables, by structure.

    The repeated part of a model (stacked layers, or the same matrix shape in
    several layers) fixes the layer dimensions (hidden and feed-forward sizes).
    A 2-D leaf outside it with one side among them and the other a size no
    layer uses (vocabulary, positions) is a table. Models without repetition
    (a plain MLP) have no tables by this rule.
    """
    repeated = collections.Counter()
    matrix_shapes = []
    for shape, d in zip(shapes, dims):
        if d is not None and len(shape) - len(d.batch_axes) == 2:
            repeated[tuple(s for i, s in enumerate(shape) if i not in d.batch_axes)] += 2
            matrix_shapes.append(None)  # a stack is repetition by itself
        elif len(shape) == 2:
            repeated[shape] += 1
            matrix_shapes.append(shape)
        else:
            matrix_shapes.append(None)
    layer_dims = {d for s, n in repeated.items() if n >= 2 for d in s}
    return [
        shape is not None
        and repeated[shape] < 2
        and (shape[0] in layer_dims) != (shape[1] in layer_dims)
        for shape in matrix_shapes
    ]


def _tucker_fallback(shape, tensor_rank, name: str) -> Optional[str]:
    """Why a tensor gets plain Adam at `tensor_rank` (None: Tucker fits it).

    A per-mode tuple that does not fit the tensor is the caller's mistake and an
    error; one int rank above a small mode's size (a 3 x 3 conv window) is not.
    """
    try:
        _tucker_plan.tucker_plan(tuple(shape), tensor_rank, None, name)
    except ValueError as e:
        if isinstance(tensor_rank, (tuple, list)):
            raise
        return f"tensor_rank {tensor_rank!r} does not fit: {e}".split("; use")[0]
    return None


@dataclasses.dataclass
class LabelRule:
    """The labels of one params tree and why each leaf got its label.

    Attributes:
      labels: the labels, a pytree with the params' structure.
      reasons: {param path: the rule that chose its label}.
      fallbacks: paths of matrices and tensors that get plain Adam only because of
        their rank (GaLore would save them no memory, or the Tucker rank does not fit).
    """

    labels: Any
    reasons: Dict[str, str]
    fallbacks: List[str]
    complex_as_real: List[str] = dataclasses.field(default_factory=list)

    def warn_fallbacks(self, stacklevel: int = 3) -> None:
        """One warning naming the leaves sent to plain Adam only by their rank (and one
        for real tensors with a trailing axis of 2 given a Tucker factor across it)."""
        if self.complex_as_real:
            warnings.warn(
                f"{', '.join(repr(p) for p in self.complex_as_real[:6])}: a real tensor whose "
                "last axis has size 2 looks like a complex weight stored as (real, imag) "
                "(PyTorch's view_as_real); Tensor-GaLore gives that axis a Tucker factor, "
                "mixing the real and imaginary parts. Store it as a complex array, or project "
                "the other modes only (modes=...)",
                stacklevel=stacklevel,
            )
        if not self.fallbacks:
            return
        shown = "; ".join(f"'{p}' ({self.reasons[p]})" for p in self.fallbacks[:6])
        more = f" and {len(self.fallbacks) - 6} more" if len(self.fallbacks) > 6 else ""
        warnings.warn(
            f"{len(self.fallbacks)} matrix/tensor param(s) get plain Adam only because of the "
            f"rank, so GaLore saves no memory on them: {shown}{more}. Use a smaller rank (or a "
            "float fraction), or silence this by labelling them 'adam' (gj.Labels(overrides=...); "
            "train.py: optimizer.label_overrides)",
            RankFallbackWarning,
            stacklevel=stacklevel,
        )


class RankFallbackWarning(UserWarning):
    """A matrix or tensor gets plain Adam only because the rank leaves nothing to save."""


def label_rule(
    params: Any,
    *,
    label_overrides: Overrides = None,
    dimension_numbers: Any = None,
    rank: Optional[Union[int, float]] = None,
    proj_type: str = "std",
    tensor_rank: Any = None,
    plain_pattern: str = DEFAULT_PLAIN_PATTERN,
    matrices: str = GALORE,
    tensors: str = TENSOR_GALORE,
) -> LabelRule:
    """`galore_labels` with the reason for each label (what `gj.describe` shows)."""
    overrides = _normalize_overrides(label_overrides)
    plain = re.compile(plain_pattern, re.IGNORECASE) if plain_pattern else None
    names, leaves, treedef = paths.leaf_paths(params)
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    dims = resolve_dimension_numbers(dimension_numbers, params)
    tables = _model_tables(shapes, dims)
    matched = set()
    reasons, fallbacks = {}, []

    complex_as_real = []

    def label(name, shape, d, table, leaf):
        for pattern, lab in overrides:
            if pattern.search(name):
                matched.add(pattern.pattern)
                return lab, f"label_overrides {pattern.pattern!r}"
        matrix_axes = len(shape) - (len(d.batch_axes) if d is not None else 0)
        if matrix_axes < 2:
            return ADAM, "vector" if len(shape) else "scalar"
        found = plain.search(name) if plain is not None else None
        if found:
            return ADAM, f"name has {found.group(0)!r}"
        if table:
            return ADAM, "table (one side a layer width, the other no layer's)"
        if d is not None or len(shape) == 2:
            kind = "stacked matrices" if d is not None and d.batch_axes else "matrix"
            if matrices == ADAM:
                return ADAM, f"{kind} (plain Adam for matrices here)"
            if rank is not None and not _matrix_plan.saves_memory(shape, d, proj_type, rank):
                fallbacks.append(name)
                return ADAM, f"rank {rank!r}: GaLore's state would not be smaller than Adam's"
            return matrices, kind
        if tensors != ADAM and tensor_rank is not None:
            why = _tucker_fallback(shape, tensor_rank, name)
            if why is not None:
                fallbacks.append(name)
                return ADAM, why
        if tensors != ADAM and shape[-1] == 2 and not jnp.iscomplexobj(leaf):
            complex_as_real.append(name)
        return tensors, f"{len(shape)}-D tensor"

    labels = []
    for name, shape, d, table, leaf in zip(names, shapes, dims, tables, leaves):
        lab, why = label(name, shape, d, table, leaf)
        labels.append(lab)
        reasons[name] = why
    for pattern, _ in overrides:
        if pattern.pattern not in matched:
            examples = ", ".join(repr(n) for n in names[:3])
            warnings.warn(
                f"label_overrides pattern {pattern.pattern!r} matches no param path (paths "
                f"look like {examples}); it has no effect",
                stacklevel=3,
            )
    return LabelRule(treedef.unflatten(labels), reasons, fallbacks, complex_as_real)


def galore_labels(params: Any, **rule: Any) -> Any:
    """Labels for each leaf of `params` (a pytree of strings with the same structure).

    Keyword arguments (those of `label_rule`, which also says why each leaf got its
    label):
      params: the parameters (arrays or ShapeDtypeStructs; `nnx.State` too).
      label_overrides: {regex: label} or [(regex, label)], searched in order in
        each param's path; the first match wins over the default rule. A
        pattern that matches no path is reported with a warning.
      dimension_numbers: as in `scale_by_galore` (None: stacked layers are found
        by structure); stacked matrices get `matrices`' label, stacked vectors
        (norm scales, biases) plain Adam.
      rank, proj_type: when given, a matrix whose GaLore state (projector plus two
        low-rank moments) would not be smaller than Adam's two moments gets plain
        Adam unless an override forces it; a `RankFallbackWarning` names such leaves.
      tensor_rank: when given, a tensor a single int rank does not fit gets plain
        Adam (with the warning); a per-mode tuple that does not fit is an error.
      plain_pattern: regex of names kept in plain Adam by default.
      matrices: label for 2-D leaves (and stacked matrices).
      tensors: label for other >= 3-D leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> import galore_jax as gj
      >>> params = {"embed": jnp.zeros((10, 4)), "q": jnp.zeros((4, 4)), "norm": jnp.zeros(4)}
      >>> gj.galore_labels(params)
      {'embed': 'adam', 'norm': 'adam', 'q': 'galore'}
    """
    rule = label_rule(params, **rule)
    rule.warn_fallbacks()
    return rule.labels


# Optimizers built by our aliases -> the function that explains their labels
# (params -> {path: reason}), read by `gj.describe`.
_EXPLAINERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def register_explainer(init_fn: Callable, explain: Callable[[Any], Dict[str, str]]) -> None:
    _EXPLAINERS[init_fn] = explain


def explain(tx, params: Any) -> Dict[str, str]:
    """{param path: why it got its label} for optimizers built by our aliases, also
    inside wrappers (`optax.chain`, `with_master_weights`, ...), else {}."""
    fn = _find_explainer(tx)
    if fn is None:
        return {}
    with warnings.catch_warnings():  # said once already, when the optimizer was built
        warnings.simplefilter("ignore")
        return fn(params)


def _find_explainer(tx):
    """The registered explainer of `tx`'s init or of an init it wraps."""
    for obj in _closures.reachable(tx):
        try:
            if callable(obj) and obj in _EXPLAINERS:
                return _EXPLAINERS[obj]
        except TypeError:  # an unhashable callable (e.g. a pytree module): not ours
            continue
    return None


def labels_by_path(labels: Any) -> Callable[[Any], Any]:
    """A labels callable that gives each leaf the label its path has in `labels`.

    For optimizers that see one part of the params at a time
    (`galore_jax.layerwise`): the default rule reads the whole tree (a table is
    told from the repeated layers by structure), so resolve it once on the whole
    params and hand the parts their labels by path.

    Example:
      >>> import jax.numpy as jnp, galore_jax as gj
      >>> params = {"wte": jnp.zeros((50, 8)), "h": jnp.zeros((3, 8, 8))}
      >>> dims = {"wte": None, "h": gj.DimensionNumbers((0,))}  # "h": 3 stacked layers
      >>> by_path = gj.labels.labels_by_path(gj.galore_labels(params, dimension_numbers=dims))
      >>> by_path({"h": jnp.zeros((8, 8))})  # one layer of "h"
      {'h': 'galore'}
    """
    names, values, _ = paths.leaf_paths(labels)
    table = dict(zip(names, values))

    def label_fn(params):
        names, _, treedef = paths.leaf_paths(params)
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(
                f"labels_by_path: no label for {missing[:3]}; resolve the labels on params "
                "with the same paths"
            )
        return treedef.unflatten([table[n] for n in names])

    return label_fn

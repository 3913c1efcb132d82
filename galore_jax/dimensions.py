"""Which axes of a leaf are batch axes (stacked layers): given, or found by structure."""

from __future__ import annotations

import collections
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

from galore_jax import paths

__all__ = ["DimensionNumbers", "infer_dimension_numbers", "resolve_dimension_numbers"]


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
    """Which axes of a leaf are batch axes (e.g. the layer axis of stacked weights).

    The two remaining axes are the matrix (rows, columns); each batch element
    gets its own projector. Give one per leaf in a pytree matching the params
    (None for the default), one for all leaves, or a callable params -> pytree.

    Example:
      >>> import galore_jax as gj
      >>> gj.DimensionNumbers(batch_axes=(0,)).batch_axes
      (0,)
    """

    batch_axes: Tuple[int, ...] = ()

    def __post_init__(self):
        axes = self.batch_axes
        if isinstance(axes, int):
            axes = (axes,)
        object.__setattr__(self, "batch_axes", tuple(int(a) for a in axes))


def infer_dimension_numbers(params) -> list:
    """Per-leaf DimensionNumbers for stacked layers found by structure (None elsewhere).

    A size L is a stack (layer) axis when it leads a 3-D leaf and at least one more
    leaf, and never appears as a non-leading dimension of any leaf with 2 or more
    axes: scanned
    layers stack (L, m, n) kernels and (L, d) norm scales and biases on a leading
    axis that no feature dimension shares. FNO spectral weights (c, c, k) or conv
    kernels (k, c_in, c_out) whose leading size is also a feature size are not
    stacks. Leaves (L, m, n) become L matrices; (L, d) become L vectors.
    """
    shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(params)]
    inner = {d for s in shapes if len(s) >= 2 for d in s[1:]}
    leading = collections.Counter(s[0] for s in shapes if len(s) >= 2)
    stacks = {s[0] for s in shapes if len(s) == 3 and s[0] not in inner and leading[s[0]] >= 2}
    return [DimensionNumbers((0,)) if len(s) in (2, 3) and s[0] in stacks else None for s in shapes]


def _is_dims_leaf(x):
    return x is None or isinstance(x, DimensionNumbers)


def resolve_dimension_numbers(dimension_numbers, params) -> list:
    """Per-leaf DimensionNumbers (or None), from any accepted form; clear errors.

    None infers stacked layers by structure (`infer_dimension_numbers`). A pytree
    is matched to the params by key path, so it also fits the masked sub-trees
    that `optax.partition` hands to an inner transform.
    """
    keypaths = jax.tree_util.tree_flatten_with_path(params)[0]
    if dimension_numbers is None:
        return infer_dimension_numbers(params)
    if isinstance(dimension_numbers, DimensionNumbers):
        n = 2 + len(dimension_numbers.batch_axes)
        return [dimension_numbers if jnp.ndim(x) == n else None for _, x in keypaths]
    tree = dimension_numbers(params) if paths.is_function(dimension_numbers) else dimension_numbers
    by_path = {
        paths.path_string(kp): d
        for kp, d in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_dims_leaf)[0]
    }
    per_leaf = []
    for keypath, _ in keypaths:
        name = paths.path_string(keypath)
        if name not in by_path:
            raise ValueError(
                "dimension_numbers does not match the params' structure: no entry for "
                f"'{name}'. Give a pytree with the params' structure holding DimensionNumbers or "
                "None at each leaf, one DimensionNumbers for all leaves, or a callable params -> "
                "such a pytree"
            )
        d = by_path[name]
        if d is not None and not isinstance(d, DimensionNumbers):
            raise TypeError(
                f"dimension_numbers entries must be DimensionNumbers or None, got {d!r}"
            )
        per_leaf.append(d)
    return per_leaf

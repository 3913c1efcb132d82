"""Which parameters get which treatment: GaLore, Tensor-GaLore, or plain Adam.

Labels are strings per leaf, for `optax.partition`:
  "galore"         matrices (2-D), and stacked matrices whose batch (layer) axes
                   are given by dimension numbers;
  "tensor_galore"  other N-D tensors (>= 3-D), e.g. FNO spectral weights;
  "adam"           embeddings, LM heads, norms, biases, vectors and scalars.
User overrides are regular expressions searched in the param's path
("layers/attn/q_proj/kernel"); the first matching one decides.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from galore_jax.projection import DimensionNumbers

GALORE = "galore"
TENSOR_GALORE = "tensor_galore"
ADAM = "adam"
LABELS = (GALORE, TENSOR_GALORE, ADAM)

# Params that stay in plain Adam by name (searched case-insensitively in the path).
DEFAULT_PLAIN_PATTERN = r"embed|lm_head|wte|wpe|norm|bias"

Overrides = Union[Mapping[str, str], Sequence[Tuple[str, str]], None]


def path_string(keypath) -> str:
  """'a/b/0/c' for a JAX key path (dict keys, attributes and indices)."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _normalize_overrides(overrides: Overrides):
  if overrides is None:
    return []
  items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
  compiled = []
  for pattern, label in items:
    if label not in LABELS:
      raise ValueError(
          f"label_overrides maps {pattern!r} to {label!r}; labels are {', '.join(LABELS)}")
    try:
      compiled.append((re.compile(pattern), label))
    except re.error as e:
      raise ValueError(f"label_overrides has an invalid regex {pattern!r}: {e}") from None
  return compiled


def galore_labels(
    params: Any,
    *,
    label_overrides: Overrides = None,
    dimension_numbers: Any = None,
    plain_pattern: str = DEFAULT_PLAIN_PATTERN,
    matrices: str = GALORE,
    tensors: str = TENSOR_GALORE,
) -> Any:
  """Labels for each leaf of `params` (a pytree of strings with the same structure).

  Args:
    params: the parameters (arrays or ShapeDtypeStructs).
    label_overrides: {regex: label} or [(regex, label)], searched in order in
      each param's path; the first match wins over the default rule.
    dimension_numbers: as in `scale_by_galore`; leaves with batch axes are
      stacked matrices and get `matrices`' label instead of `tensors`'.
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
  overrides = _normalize_overrides(label_overrides)
  plain = re.compile(plain_pattern, re.IGNORECASE) if plain_pattern else None
  if dimension_numbers is not None and callable(dimension_numbers) and not isinstance(
      dimension_numbers, DimensionNumbers):
    dimension_numbers = dimension_numbers(params)
  if isinstance(dimension_numbers, DimensionNumbers) or dimension_numbers is None:
    dims_by_path = None
  else:
    dims_by_path = dict(jax.tree_util.tree_flatten_with_path(
        dimension_numbers, is_leaf=lambda x: x is None or isinstance(x, DimensionNumbers))[0])

  def label(keypath, leaf):
    path = path_string(keypath)
    for pattern, lab in overrides:
      if pattern.search(path):
        return lab
    ndim = len(jnp.shape(leaf))
    if ndim < 2 or (plain is not None and plain.search(path)):
      return ADAM
    if ndim == 2:
      return matrices
    if isinstance(dimension_numbers, DimensionNumbers):
      stacked = ndim == 2 + len(dimension_numbers.batch_axes)
    else:
      stacked = dims_by_path is not None and dims_by_path.get(keypath) is not None
    return matrices if stacked else tensors

  return jax.tree_util.tree_map_with_path(label, params)

"""How many bytes an optimizer state holds, per label, against AdamW."""

from __future__ import annotations

from typing import Any, Dict

import jax
import numpy as np


def _nbytes(x) -> int:
    return int(np.prod(getattr(x, "shape", ()), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def optimizer_state_bytes(state: Any) -> int:
    """Total bytes of all arrays in `state` (arrays or ShapeDtypeStructs)."""
    return sum(_nbytes(x) for x in jax.tree.leaves(state) if hasattr(x, "dtype"))


def adamw_state_bytes(params: Any) -> int:
    """Bytes AdamW would hold: two moments in the params' dtypes (+ its step counter)."""
    return 2 * sum(_nbytes(x) for x in jax.tree.leaves(params)) + 4


def memory_report(state: Any, params: Any) -> Dict[str, Any]:
    """Optimizer-state bytes per label (from `optax.partition`), total, and vs AdamW.

    Example:
      >>> import jax, jax.numpy as jnp, galore_jax as gj
      >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
      >>> report = gj.memory_report(gj.galore_adamw(1e-3, rank=8).init(params), params)
      >>> report["per_label"]["galore"] < report["adamw_bytes"]
      True
    """
    per_label: Dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not hasattr(leaf, "dtype"):
            continue
        label = "other"
        for i, key in enumerate(path[:-1]):
            if getattr(key, "name", None) == "inner_states" and hasattr(path[i + 1], "key"):
                label = str(path[i + 1].key)
                break
        per_label[label] = per_label.get(label, 0) + _nbytes(leaf)
    total = sum(per_label.values())
    adamw = adamw_state_bytes(params)
    return {
        "total_bytes": total,
        "per_label": per_label,
        "adamw_bytes": adamw,
        "ratio_to_adamw": total / adamw if adamw else float("nan"),
    }

"""What an optimizer does to each parameter: label, projection side, rank, state shapes, bytes.

`describe(tx, params)` reads it off the optimizer's abstract state
(`jax.eval_shape(tx.init, params)`, nothing allocated), so it works for any
chain around our transforms (`optax.partition`, `optax.masked`, clipping,
`MultiSteps`, ...) and shows exactly what `tx.init` builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from galore_jax import _quantization as quantization
from galore_jax import labels as labels_lib
from galore_jax import paths

__all__ = ["LeafTreatment", "Treatment", "describe"]

_PROJECTOR_FIELDS = ("left", "right", "left_scales", "right_scales", "factors")
# Per-param state that is neither a projector nor a moment: APOLLO's random
# projection keys (the projection is regenerated from them), Fira's and APOLLO's
# norm-growth limiter (the last residual norm).
_PER_LEAF_FIELDS = frozenset(("projection_keys", "limiter"))


@dataclasses.dataclass
class LeafTreatment:
    """One param's treatment.

    Attributes:
      path: the param's path ("layers/mlp/up_proj").
      shape: the param's shape.
      label: `optax.partition` label ("galore", "tensor_galore", "adam", ...), or
        "-" when the optimizer does not partition.
      side: "left" / "right" / "full" (GaLore, Fira, APOLLO with an SVD), "random left" /
        "random right" (APOLLO's regenerated random projection), "tucker"
        (Tensor-GaLore) or "-".
      rank: GaLore rank, Tucker ranks per mode, or None.
      projector_shapes: shapes of the projectors / Tucker factors kept for it (their
      codes' shapes when quantized: int4 packs two values per byte).
      moment_shapes: shapes of the other state arrays kept for it (moments).
      bytes: state bytes kept for it (projectors + moments).
      why: the rule that chose its label ("matrix", "name has 'norm'", "rank 128 >=
        the matrix's smaller side", ...), for optimizers built by `galore_adamw` /
        `tensor_galore_adamw`; "-" otherwise.
    """

    path: str
    shape: Tuple[int, ...]
    label: str = "-"
    side: str = "-"
    rank: Any = None
    projector_shapes: List[Tuple[int, ...]] = dataclasses.field(default_factory=list)
    moment_shapes: List[Tuple[int, ...]] = dataclasses.field(default_factory=list)
    bytes: int = 0
    why: str = "-"


@dataclasses.dataclass
class Treatment:
    """Per-leaf treatments plus the state bytes not tied to one param (counters, keys)."""

    leaves: List[LeafTreatment]
    shared_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(leaf.bytes for leaf in self.leaves) + self.shared_bytes

    def by_path(self) -> Dict[str, LeafTreatment]:
        return {leaf.path: leaf for leaf in self.leaves}

    def __str__(self) -> str:
        header = (
            "param",
            "shape",
            "label",
            "side",
            "rank",
            "projectors",
            "moments",
            "bytes",
            "why",
        )
        rows = [header]
        for t in self.leaves:
            rows.append(
                (
                    t.path,
                    _shape(t.shape),
                    t.label,
                    t.side,
                    "-" if t.rank is None else str(t.rank),
                    " ".join(map(_shape, t.projector_shapes)) or "-",
                    " ".join(map(_shape, t.moment_shapes)) or "-",
                    f"{t.bytes:,}",
                    t.why,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"total optimizer state: {self.total_bytes:,} bytes "
            f"({self.shared_bytes:,} in counters and keys)"
        )
        return "\n".join(lines)


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "()"


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _owner(state_path: List[str], param_paths: List[List[str]]) -> Optional[int]:
    """Index of the param whose path ends the state leaf's path (longest wins), if any.

    optax states hold params-shaped trees, so a state leaf's path ends with its
    param's path; for the params tree itself (a bare array) the path is empty.
    """
    best, best_len = None, -1
    for i, p in enumerate(param_paths):
        n = len(p)
        if n > best_len and n <= len(state_path) and state_path[len(state_path) - n :] == p:
            best, best_len = i, n
    return best


def describe(tx, params: Any) -> Treatment:
    """Describes what `tx` keeps for each leaf of `params`.

    Args:
      tx: an optax transformation (e.g. `gj.galore_adamw(...)`, or any chain).
      params: params or their ShapeDtypeStructs.

    Returns:
      A `Treatment`; `print` it for a table.

    Example:
      >>> import jax.numpy as jnp, galore_jax as gj
      >>> params = {"embed": jnp.zeros((64, 16)), "w": jnp.zeros((16, 32)), "b": jnp.zeros(32)}
      >>> t = gj.describe(gj.galore_adamw(1e-3, rank=4), params).by_path()
      >>> t["w"].label, t["w"].side, t["w"].rank, t["w"].projector_shapes, t["w"].moment_shapes
      ('galore', 'left', 4, [(16, 4)], [(4, 32), (4, 32)])
      >>> t["embed"].label, t["embed"].moment_shapes
      ('adam', [(64, 16), (64, 16)])
    """
    state = jax.eval_shape(tx.init, params)
    reasons = labels_lib.explain(tx, params)
    param_names, param_leaves, _ = paths.leaf_paths(params)
    split_names = [n.split("/") if n != "<root>" else [] for n in param_names]
    leaves = [
        LeafTreatment(n, tuple(x.shape), why=reasons.get(n, "-"))
        for n, x in zip(param_names, param_leaves)
    ]
    shared = 0
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=quantization.is_quantized)[0]
    for keypath, leaf in flat:
        # A block-quantized moment (codes + scales) counts as one moment of its value's shape.
        shape = quantization.value_shape(leaf) if quantization.is_quantized(leaf) else None
        nbytes = sum(_nbytes(x) for x in jax.tree.leaves(leaf) if hasattr(x, "shape"))
        if shape is None:
            if not hasattr(leaf, "shape"):
                continue
            shape = tuple(leaf.shape)
        names = paths.path_string(keypath).split("/")
        owner = _owner(names, split_names)
        per_leaf = _PER_LEAF_FIELDS.intersection(names)  # a key, a limiter's norm
        if owner is None or (not shape and not per_leaf):
            shared += nbytes
            continue
        t = leaves[owner]
        t.bytes += nbytes
        if "inner_states" in names and names.index("inner_states") + 1 < len(names):
            t.label = names[names.index("inner_states") + 1]
        if per_leaf:
            t.side = "random" if "projection_keys" in per_leaf and t.side == "-" else t.side
            continue
        field = next((f for f in reversed(names) if f in _PROJECTOR_FIELDS), None)
        if field is None:
            t.moment_shapes.append(shape)
            continue
        if field.endswith("_scales"):  # a quantized projector's scales: bytes only
            continue
        t.projector_shapes.append(shape)
        if field == "factors":
            t.side = "tucker"
            t.rank = tuple(s[-1] for s in t.projector_shapes)
        else:
            t.side = field if t.side in ("-", field) else "full"
            t.rank = shape[-1] if field == "left" else shape[-2]
    for t in leaves:  # a random projection (APOLLO): side and rank from the moments
        low = [m for m in t.moment_shapes if len(m) == len(t.shape) and m != t.shape]
        if t.side == "random" and low:
            right = low[0][-1] != t.shape[-1]
            t.side, t.rank = ("random right", low[0][-1]) if right else ("random left", low[0][-2])
    return Treatment(leaves, shared)

"""Small array ops that stay valid under Explicit-mode sharding.

In Explicit mode (the `jax.make_mesh` default) sharding is part of an array's
type: a matmul whose contracting dimension is sharded needs an ``out_sharding``
and dense factorisations (SVD, eigh, QR) refuse operands sharded on their matrix
dimensions. These helpers read the operands' sharding types at trace time and do
the right thing; in Auto mode and on one device they are plain ``jnp`` calls.

Shardings are always built as ``NamedSharding`` on the mesh found in the
operands' types (``jax.typeof(x).sharding.mesh``), never as a bare
``PartitionSpec``: users jit on an Explicit mesh without entering
``jax.set_mesh``, and a bare spec would need that ambient mesh.
"""

from __future__ import annotations

import string
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def explicit_spec(x: jax.Array) -> Optional[tuple]:
    """The explicit sharding of `x` as a per-dimension tuple, or None.

    None means nothing is known at trace time (Auto mode, no mesh, or fully
    replicated), so callers can skip sharding annotations entirely.
    """
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # pylint: disable=broad-except
        return None
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    entries = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    if all(e is None for e in entries):
        return None
    return entries


def _sharding(x: jax.Array, entries: Sequence) -> NamedSharding:
    """NamedSharding with per-dimension `entries` on the mesh of `x`'s type."""
    return NamedSharding(jax.typeof(x).sharding.mesh, P(*entries))


def _mesh_axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def einsum(subscripts: str, *operands: jax.Array, preferred_element_type=None):
    """`jnp.einsum` that supplies `out_sharding` when operands are explicitly sharded.

    Each output dimension takes the sharding its letter has in the first operand
    where that letter is sharded; a mesh axis is used at most once in the result.
    Leading batch dimensions may be written as `...`.
    """
    specs = [explicit_spec(op) for op in operands]
    kwargs = {}
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    if all(s is None for s in specs):
        return jnp.einsum(subscripts, *operands, **kwargs)
    inputs, output = subscripts.split("->")
    inputs = inputs.split(",")
    spare = iter(c for c in string.ascii_letters if c not in subscripts)
    batch_letters = {}

    def expand(term: str, ndim: int) -> str:
        if "..." not in term:
            return term
        n_batch = ndim - (len(term) - 3)
        letters = "".join(batch_letters.setdefault(i, next(spare)) for i in range(n_batch))
        return term.replace("...", letters)

    inputs = [expand(t, op.ndim) for t, op in zip(inputs, operands)]
    if "..." in output:
        n_batch = max(len(batch_letters), 0)
        output = output.replace("...", "".join(batch_letters[i] for i in range(n_batch)))
    letter_spec = {}
    for term, spec in zip(inputs, specs):
        if spec is None:
            continue
        for letter, entry in zip(term, spec):
            if entry is not None and letter not in letter_spec:
                letter_spec[letter] = entry
    used = set()
    out_entries = []
    for letter in output:
        entry = letter_spec.get(letter)
        axes = _mesh_axes(entry)
        if entry is not None and not used.intersection(axes):
            used.update(axes)
            out_entries.append(entry)
        else:
            out_entries.append(None)
    sharded = next(op for op, spec in zip(operands, specs) if spec is not None)
    return jnp.einsum(
        ",".join(inputs) + "->" + output,
        *operands,
        out_sharding=_sharding(sharded, out_entries),
        **kwargs,
    )


def replicate_matrix_dims(x: jax.Array) -> jax.Array:
    """Gathers the last two dimensions of an explicitly sharded array (batch dims stay)."""
    spec = explicit_spec(x)
    if spec is None or (spec[-1] is None and spec[-2] is None):
        return x
    return jax.sharding.reshard(x, _sharding(x, (*spec[:-2], None, None)))


def replicate(x: jax.Array) -> jax.Array:
    """Gathers every dimension of an explicitly sharded array."""
    if explicit_spec(x) is None:
        return x
    return jax.sharding.reshard(x, _sharding(x, [None] * x.ndim))


def match_sharding(x: jax.Array, like: jax.Array) -> jax.Array:
    """Reshards `x` to the explicit sharding of `like` (so `lax.cond` branches agree)."""
    target = explicit_spec(like)
    current = explicit_spec(x)
    if target == current:
        return x
    source = like if target is not None else x
    return jax.sharding.reshard(x, _sharding(source, target or (None,) * x.ndim))


def swap_last(x: jax.Array) -> jax.Array:
    """Conjugate transpose of the last two axes."""
    return jnp.conj(jnp.swapaxes(x, -1, -2))


def moveaxes_to_front(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    return jnp.moveaxis(x, tuple(axes), tuple(range(len(axes)))) if axes else x

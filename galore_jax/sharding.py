"""Shardings for the whole optimizer state, derived from the params' shardings.

Our states store every array with the param's axis order, replacing only the
projected axis by the rank (projector U: (*batch, m, r), Vh: (*batch, r, n),
low-rank moments (*batch, r, n) / (*batch, m, r) / (*batch, r, r)). So each
state leaf is matched to its param by key path, and every axis that kept the
param's size keeps the param's sharding of that axis; rank-sized axes (and
Tucker factors and cores, which do not line up with the param's axes) are
replicated. Full-size moments of plain-Adam leaves simply get the param's
sharding; counters and PRNG keys are replicated. This holds for any optax
chain around our transforms (partition, MultiSteps, inject_hyperparams, ...).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def _is_sharding_leaf(x):
    return x is None or isinstance(x, (P, jax.sharding.Sharding))


def _as_named(sharding, mesh: Optional[Mesh]) -> NamedSharding:
    if isinstance(sharding, NamedSharding):
        return sharding
    if sharding is None:
        sharding = P()
    if isinstance(sharding, P):
        if mesh is None:
            raise ValueError("param_shardings holds PartitionSpecs: pass the `mesh` they refer to")
        return NamedSharding(mesh, sharding)
    raise TypeError(
        f"param_shardings entries must be NamedSharding or PartitionSpec, got {sharding!r}"
    )


def _is_subpath(sub, path) -> Optional[int]:
    n = len(sub)
    for start in range(len(path) - n + 1):
        if tuple(path[start : start + n]) == tuple(sub):
            return n
    return None


def state_shardings(
    abstract_state: Any, params: Any, param_shardings: Any, mesh: Optional[Mesh] = None
) -> Any:
    """NamedShardings for every leaf of an optimizer state.

    Args:
      abstract_state: the state or its `jax.eval_shape(tx.init, params)`.
      params: params (arrays or ShapeDtypeStructs) the state was built for.
      param_shardings: pytree matching `params` of NamedSharding or
        PartitionSpec (then `mesh` is required).
      mesh: mesh for PartitionSpec inputs (default: taken from a NamedSharding).

    Returns:
      A pytree with the state's structure holding NamedShardings, for
      `jax.jit(..., out_shardings=...)`, `jax.device_put` or orbax restore targets.

    Example:
      >>> import jax, jax.numpy as jnp, galore_jax as gj
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> params = {"w": jnp.zeros((8, 4))}
      >>> tx = gj.scale_by_galore(rank=2)
      >>> shardings = gj.state_shardings(jax.eval_shape(tx.init, params), params,
      ...                                {"w": P("fsdp", None)}, mesh)
      >>> tuple(shardings.projectors.right["w"].spec)  # Vh (rank, n): n's spec; rank replicated
      (None, None)
    """
    p_paths, p_treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        shard_leaves = p_treedef.flatten_up_to(param_shardings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"param_shardings does not match the params' structure: {e}") from None
    if mesh is None:
        for s in shard_leaves:
            if isinstance(s, NamedSharding):
                mesh = s.mesh
                break
    named = [_as_named(s, mesh) for s in shard_leaves]
    if mesh is None:
        raise ValueError("no mesh: pass `mesh` or NamedShardings in param_shardings")
    entries = []
    for (path, leaf), sharding in zip(p_paths, named):
        shape = tuple(leaf.shape)
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(tuple(sharding.spec)))
        entries.append((tuple(path), shape, spec))

    def leaf_sharding(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        best, best_len = None, 0
        for p_path, p_shape, p_spec in entries:
            n = _is_subpath(p_path, path) if p_path else None
            if n is not None and n > best_len:
                best, best_len = (p_shape, p_spec), n
        if best is None or len(best[0]) != len(shape):
            return NamedSharding(mesh, P())
        p_shape, p_spec = best
        spec = [s if d == pd else None for d, pd, s in zip(shape, p_shape, p_spec)]
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)

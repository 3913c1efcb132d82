"""Device mesh, logical-axis sharding rules and multi-host start-up.

Params carry logical axis names (``embed``, ``mlp``, ``heads``, ``layers``...);
a rules table maps each name to mesh axes (``data``, ``fsdp``, ``tensor``).
Everything here is plain ``jax.sharding``: a ``Mesh`` from ``jax.make_mesh``,
``PartitionSpec`` and ``NamedSharding``.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from training.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Batches are split over every data-parallel axis: plain data parallel and FSDP.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]


def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-host setup is described.

    Arguments win over the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Must run before any other JAX
    call touches the devices.

    Returns:
      True when the distributed runtime was initialized.
    """
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def make_mesh(shape: Mapping[str, int], kind: str = "auto") -> jax.sharding.Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh over the first devices it needs.

    Args:
      shape: axis name -> size, sizes already resolved (no -1).
      kind: ``auto`` or ``explicit`` (sharding-in-types) for every axis.
    """
    axis_type = {
        "auto": jax.sharding.AxisType.Auto,
        "explicit": jax.sharding.AxisType.Explicit,
    }[kind]
    sizes = tuple(int(shape[name]) for name in MESH_AXES)
    devices = jax.devices()[: math.prod(sizes)]
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES), devices=devices
    )


def use_mesh(mesh: jax.sharding.Mesh) -> contextlib.AbstractContextManager:
    """Context that makes ``mesh`` current (needed for explicit-mode sharding)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)  # older jax


def normalize_rules(rules: Iterable[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Rules as ``((logical, mesh_axes), ...)`` with lists turned into tuples."""
    normalized = []
    for logical, target in rules:
        if isinstance(target, list):
            target = tuple(target)
        normalized.append((logical, target))
    return tuple(normalized)


def named_shardings(mesh: jax.sharding.Mesh, specs: Any) -> Any:
    """Pytree of ``PartitionSpec`` -> pytree of ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh: jax.sharding.Mesh, leading_dims: int = 0) -> NamedSharding:
    """Sharding for a batch: its batch dim split over ``(data, fsdp)``.

    Args:
      leading_dims: unsharded dims before the batch dim (e.g. 1 for a
        ``[micro_steps, batch, seq]`` array of gradient-accumulation micro-batches).
    """
    return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _spec_axis_size(entry: Any, mesh: jax.sharding.Mesh) -> int:
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[a] for a in axes]))


def check_divisible(shapes: Any, specs: Any, mesh: jax.sharding.Mesh, what: str = "param") -> None:
    """Checks every sharded dim is divisible by its mesh axes' total size.

    Args:
      shapes: pytree of arrays / ``ShapeDtypeStruct`` (anything with ``.shape``).
      specs: matching pytree of ``PartitionSpec``.

    Raises:
      ConfigError: naming the first param whose dim does not split evenly.
    """
    paths_and_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    if len(spec_leaves) != len(paths_and_shapes):
        raise ValueError("shapes and specs trees do not match")
    for (path, leaf), spec in zip(paths_and_shapes, spec_leaves):
        for dim, entry in enumerate(spec):
            size = _spec_axis_size(entry, mesh)
            if size > 1 and leaf.shape[dim] % size:
                name = gj.paths.path_string(path)
                raise ConfigError(
                    f"{what} '{name}' dim {dim} (size {leaf.shape[dim]}) cannot be split "
                    f"over mesh axes {entry!r} (size {size}); change the mesh sizes or "
                    "mesh.rules"
                )


def describe(mesh: jax.sharding.Mesh) -> str:
    kind = (
        "explicit" if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types) else "auto"
    )
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"mesh {axes} ({kind}, {mesh.devices.size} devices)"

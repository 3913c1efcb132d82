"""Param paths as strings: how every part of galore_jax names a leaf.

A leaf's path is its JAX key path joined with "/" ("layers/attn/q_proj/kernel").
Flax NNX Variables flatten with a trailing `.value` attribute; it is dropped, so
`nnx.state(model)` and `nnx.as_pure(nnx.state(model))` name leaves alike.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import jax

__all__ = ["path_string", "leaf_paths", "is_function"]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_string(keypath) -> str:
    """'a/b/0/c' for a JAX key path (dict keys, attributes, indices; NNX `.value` dropped).

    Example:
      >>> import jax, galore_jax as gj
      >>> flat = jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0]
      >>> [gj.paths.path_string(p) for p, _ in flat]
      ['a/0', 'a/1']
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def leaf_paths(tree: Any) -> Tuple[List[str], List[Any], Any]:
    """(path strings, leaves, treedef) of `tree`; a bare array's path is '<root>'."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_string(path) or "<root>" for path, _ in leaves_with_path]
    return paths, [leaf for _, leaf in leaves_with_path], treedef


def is_function(x: Any) -> bool:
    """Whether `x` is a function of the params rather than a pytree to match them.

    A callable that is also a pytree node (an Equinox module, anything registered
    with `jax.tree_util` and given a `__call__`) is a tree: calling it would run
    the user's model. Only callables that JAX treats as leaves are functions.

    Example:
      >>> import galore_jax as gj
      >>> gj.paths.is_function(lambda params: params), gj.paths.is_function({"w": None})
      (True, False)
    """
    return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree.structure(x))

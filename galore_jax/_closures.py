"""What an optax transformation holds: the objects reachable from it.

optax's combinators (chain, partition, masked, with_extra_args_support, ...) and
ours (with_master_weights, the aliases) keep the transformations they wrap in
the closures of their init / update functions, so these are found by walking
containers, partials and closure cells. An object held as a method's ``self``
is not reached.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Iterable, Iterator, Optional

_MAX_NODES = 100_000  # a bound on the walk (labels trees are walked too)


def cells(fn: types.FunctionType) -> dict:
    """A function's closure as {free variable: value} (empty cells left out)."""
    out = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            out[name] = cell.cell_contents
        except ValueError:
            pass
    return out


def reachable(
    root: Any, *, extra: Optional[Callable[[Any], Iterable[Any]]] = None
) -> Iterator[Any]:
    """Every object reachable from `root` (root first), each once.

    `extra(obj)` may name more objects to walk from `obj` (e.g. what a lazy
    factory would build).
    """
    seen, todo = set(), [root]
    while todo and len(seen) < _MAX_NODES:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, (tuple, list)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, functools.partial):
            todo.extend([obj.func, *obj.args, *obj.keywords.values()])
        elif isinstance(obj, types.FunctionType):
            todo.extend(cells(obj).values())
        if extra is not None:
            todo.extend(extra(obj))

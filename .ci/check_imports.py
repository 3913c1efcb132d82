#!/usr/bin/env python3
"""Import contracts: dependencies point one way, and no first-party import cycles.

    python3 .ci/check_imports.py [ROOT]      # ROOT: the repository (default: this one)

Reads every ``.py`` file of galore_jax/, models/, training/, tasks/, train.py and
benchmarks/ with ``ast`` (nothing is imported or executed) and checks:

* the library, galore_jax, imports no flax, orbax, pydantic, yaml, tqdm, models,
  training, tasks or train (it needs jax, optax and numpy only);
* models import no galore_jax, training, tasks or train;
* training (the task-agnostic runtime) imports no tasks or train;
* tasks import no train;
* no import cycle among the first-party modules.

Every import counts: at the top of a module, inside a function (run later, but
a cycle all the same), under ``if TYPE_CHECKING:``. Relative imports are
resolved, and ``from pkg import name`` is an import of the module ``pkg.name``
where there is one (else of ``pkg``). A package's ``__init__`` is not counted
as imported by its submodules' imports (Python has it loaded already). The
scripts in benchmarks/ import each other by file name (``import _common``).

Prints ``file:line: rule`` for each violation; exit status 1 if there is any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, Optional

PACKAGES = ("galore_jax", "models", "training", "tasks")
SCRIPTS = ("train.py",)
SCRIPT_DIRS = ("benchmarks",)  # their modules import each other by file name

# Layer -> (top-level names it must not import, why).
FORBIDDEN = {
    "galore_jax": (
        ("flax", "orbax", "pydantic", "yaml", "tqdm", "models", "training", "tasks", "train"),
        "the library imports jax, optax and numpy only",
    ),
    "models": (
        ("galore_jax", "training", "tasks", "train"),
        "models import jax, flax and numpy only",
    ),
    "training": (("tasks", "train"), "the runtime is task-agnostic: tasks build on it"),
    "tasks": (("train",), "train.py is the top: nothing imports it"),
}


class Module:
    """One first-party source file."""

    def __init__(self, name: str, path: Path, rel: str, is_package: bool, scope: str = ""):
        self.name, self.path, self.rel = name, path, rel
        self.is_package = is_package
        self.scope = scope  # "benchmarks" for a script dir's modules, else ""


def _modules(root: Path) -> dict[str, Module]:
    found: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join(parts)
            found[name] = Module(name, path, path.relative_to(root).as_posix(), is_package)
    for script in SCRIPTS:
        path = root / script
        if path.is_file():
            found[path.stem] = Module(path.stem, path, script, False)
    for directory in SCRIPT_DIRS:
        for path in sorted((root / directory).glob("*.py")):
            name = f"{directory}.{path.stem}"
            rel = path.relative_to(root).as_posix()
            found[name] = Module(name, path, rel, False, scope=directory)
    return found


def _imports(tree: ast.AST, module: Module) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, absolute module name, imported names)`` of every import in ``tree``.

    ``import a.b`` gives ``("a.b", [])``; ``from a import b, c`` gives
    ``("a", ["b", "c"])``; relative imports are made absolute.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if not node.level:
                yield node.lineno, node.module or "", names
                continue
            package = module.name.split(".")
            if not module.is_package:
                package = package[:-1]
            if node.level > 1:
                package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
            yield node.lineno, base, names


def _resolve(name: str, modules: dict[str, Module], scope: str) -> Optional[str]:
    """The first-party module an import of ``name`` loads (its longest known prefix);
    None for a third-party or standard-library module."""
    parts = name.split(".")
    if scope and f"{scope}.{parts[0]}" in modules:  # a sibling script, by file name
        return f"{scope}.{parts[0]}"
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _layer(module: Module) -> Optional[str]:
    top = module.name.split(".")[0]
    return top if top in FORBIDDEN and not module.scope else None


def check(root: Path) -> list[str]:
    """Every violation under ``root`` as ``file:line: rule`` (an empty list: none)."""
    root = Path(root)
    modules = _modules(root)
    violations: list[str] = []
    edges: dict[str, dict[str, tuple[str, int]]] = {name: {} for name in modules}
    for module in modules.values():
        try:
            tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
        except SyntaxError as e:
            violations.append(f"{module.rel}:{e.lineno or 0}: cannot parse ({e.msg})")
            continue
        layer = _layer(module)
        for line, name, names in _imports(tree, module):
            if layer is not None and name:
                forbidden, why = FORBIDDEN[layer]
                top = name.split(".")[0]
                if top in forbidden:
                    violations.append(f"{module.rel}:{line}: {layer} imports {top} ({why})")
            # "from a import b": the module a.b if there is one, else a (b is a name in a).
            targets = [f"{name}.{n}" if name else n for n in names if n != "*"] or [name]
            for target in targets:
                resolved = _resolve(target, modules, module.scope)
                if resolved is not None and resolved != module.name:
                    edges[module.name].setdefault(resolved, (module.rel, line))
    violations.extend(_cycles(edges))
    return violations


def _cycles(edges: dict[str, dict[str, tuple[str, int]]]) -> list[str]:
    """One ``file:line: import cycle: a -> b -> a`` per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan, iterative (deep packages stay within limits)
        work = [(node, iter(sorted(edges[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[current] = min(low[current], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)

    found = []
    for component in sorted(components):
        path = _cycle_through(component[0], set(component), edges)
        rel, line = edges[path[0]][path[1]]
        found.append(f"{rel}:{line}: import cycle: {' -> '.join(path)}")
    return found


def _cycle_through(start: str, members: set[str], edges) -> list[str]:
    """The shortest import path from ``start`` back to itself within ``members``."""
    previous: dict[str, Optional[str]] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle")


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    violations = check(root)
    for violation in violations:
        print(violation)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

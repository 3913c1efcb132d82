"""The Examples in galore_jax's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import galore_jax

# Every module of the library (subpackages too), so a new module's examples cannot go untested.
MODULES = sorted(
    m.name.removeprefix("galore_jax.")
    for m in pkgutil.walk_packages(galore_jax.__path__, prefix="galore_jax.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"galore_jax.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in galore_jax.{name}"

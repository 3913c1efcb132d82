"""The Examples in galore_jax's docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["linalg", "projection", "transform", "alias", "labels", "sharding", "memory", "adam"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(f"galore_jax.{name}")
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest(s) failed in galore_jax.{name}"

"""Keyword arguments of galore-jax 0.2.0 that moved into option objects (0.3.0).

A factory decorated with `moved_keywords` still takes them: each is folded into
the option object that now holds it, with one `DeprecationWarning` naming the
new spelling. The signature users see (`inspect.signature`, `help`) is the new one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Callable

from galore_jax import options

# old keyword -> field of the option object
REFRESH_KEYWORDS = {
    "oversample": "oversample",
    "power_iters": "power_iters",
    "warm_start": "warm_start",
    "intermediate_passes": "passes",
    "eigh_implementation": "eigh",
    "seed": "seed",
}
PROJECTOR_KEYWORDS = {
    "projector_bits": "bits",
    "projector_group_size": "group_size",
    "projector_dtype": "dtype",
}
ADAM_KEYWORDS = {
    "b1": "b1",
    "b2": "b2",
    "eps": "eps",
    "mu_dtype": "mu_dtype",
    "moment_bits": "bits",
}
LABELS_KEYWORDS = {"label_overrides": "overrides", "dimension_numbers": "dimension_numbers"}
TUCKER_KEYWORDS = {"tensor_rank": "rank", "tensor_svd": "svd"}


def _refresh(current, fields: dict):
    refresh = options.as_refresh(current)
    if isinstance(refresh, options.ExactSVD):  # 0.2.0 ignored the sketch options there
        if fields.get("eigh") is not None:
            raise ValueError(
                f"eigh_implementation={fields['eigh']!r} applies to svd='randomized' (the "
                "Rayleigh-Ritz eigh); an exact SVD has none: leave it None"
            )
        fields = {k: v for k, v in fields.items() if k == "seed"}
    return dataclasses.replace(refresh, **fields)


def _projector(current, fields: dict):
    fields = {k: v for k, v in fields.items() if v is not None}
    return dataclasses.replace(current or options.ProjectorStorage(), **fields)


def _adam(current, fields: dict):
    if fields.get("bits", 0) is None:
        fields["bits"] = 32
    return dataclasses.replace(current or options.AdamOptions(), **fields)


def _labels(current, fields: dict):
    if not isinstance(current, options.Labels):
        current = options.Labels(tree=current)
    return dataclasses.replace(current, **fields)


def _tucker(current, fields: dict):
    return dataclasses.replace(current or options.Tucker(), **fields)


_BUILDERS = {"svd": _refresh, "projector": _projector, "adam": _adam, "labels": _labels}
_BUILDERS["tensor"] = _tucker


def _tucker_follows(kwargs: dict, grouped: dict, signature) -> None:
    """0.2.0's galore_adamw gave its Tucker refresh the matrix refresh's sketch options
    and seed (the Tucker key drew from seed + 1, as it still does)."""
    fields = dict(grouped.get("svd", {}))
    fields.pop("passes", None), fields.pop("eigh", None)  # matrix-only options in 0.2.0
    tucker = kwargs.get("tensor", signature.parameters["tensor"].default)
    if fields and (tucker is None or "tensor" in grouped):
        tucker = tucker or options.Tucker()
        kwargs["tensor"] = dataclasses.replace(tucker, svd=_refresh(tucker.svd, fields))


def moved_keywords(**moved: dict) -> Callable:
    """Decorator: `moved[param]` maps 0.2.0 keywords to fields of the option `param`."""

    def decorate(factory: Callable) -> Callable:
        signature = inspect.signature(factory)
        old_to_new = {old: (param, field) for param, m in moved.items() for old, field in m.items()}

        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            old = {k: kwargs.pop(k) for k in list(kwargs) if k in old_to_new}
            if not old:
                return factory(*args, **kwargs)
            grouped = {}
            for key, value in old.items():
                param, field = old_to_new[key]
                grouped.setdefault(param, {})[field] = value
            spelled = ", ".join(f"{k}= -> {old_to_new[k][0]}.{old_to_new[k][1]}" for k in old)
            warnings.warn(
                f"{factory.__name__}: keywords of galore-jax 0.2.0 ({spelled}) moved into "
                "option objects (see CHANGELOG.md); they still work for now",
                DeprecationWarning,
                stacklevel=2,
            )
            for param, fields in grouped.items():
                current = kwargs.get(param, signature.parameters[param].default)
                kwargs[param] = _BUILDERS[param](current, fields)
            if "tensor" in signature.parameters:
                _tucker_follows(kwargs, grouped, signature)
            return factory(*args, **kwargs)

        return wrapper

    return decorate

"""Option objects: how a subspace is refreshed, how projectors and moments are stored.

Each is a frozen, hashable dataclass, so it can be a static argument of
`jax.jit` or `optax.inject_hyperparams`, and is checked when it is built: a bad
value is an error naming the field and the accepted range. The transforms take
them in place of long keyword lists; a string stays accepted where one names a
whole object (`svd="randomized"` is `RandomizedSVD()`, `svd="exact"` is
`ExactSVD()`).

Example:
  >>> import galore_jax as gj
  >>> tx = gj.galore_adamw(
  ...     1e-3,
  ...     rank=64,
  ...     svd=gj.RandomizedSVD(oversample=16, power_iters=2),
  ...     projector=gj.ProjectorStorage(bits=8),
  ...     adam=gj.AdamOptions(b2=0.95, bits=8),
  ... )
  >>> gj.RandomizedSVD(passes=3)
  Traceback (most recent call last):
  ...
  ValueError: RandomizedSVD.passes must be <= 2, got 3
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import jax.numpy as jnp

from galore_jax import _checks

__all__ = ["AdamOptions", "ExactSVD", "Labels", "ProjectorStorage", "RandomizedSVD", "Tucker"]

EIGH_IMPLEMENTATIONS = (None, "qr", "jacobi")


def _int(owner: str, field: str, value, *, minimum: int, maximum: Optional[int] = None) -> None:
    name = f"{owner}.{field}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _bool(owner: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{field} must be True or False, got {value!r}")


def _float(owner: str, field: str, value, *, low: float, high: float, closed_high=False) -> None:
    name = f"{owner}.{field}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        raise ValueError(
            f"{name} must be in [{low}, {high}{']' if closed_high else ')'}, got {value}"
        )


def _dtype(owner: str, field: str, value):
    if value is None:
        return None
    try:  # by name: hashable, and YAML / JSON safe
        return jnp.dtype(value).name
    except TypeError:
        raise TypeError(f"{owner}.{field} must be a dtype or None, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class RandomizedSVD:
    """Refresh a subspace with GaLore 2's randomized range finder (the default).

    A Gaussian sketch of width `rank + oversample` (optionally started from the
    previous basis), `power_iters` power iterations orthonormalised with shifted
    Cholesky-QR, and the ordered top-`rank` basis from `eigh` of a small Gram
    matrix (Rayleigh-Ritz); see `galore_jax.linalg.randomized_svd`.

    Attributes:
      oversample: extra sketch columns.
      power_iters: power iterations.
      warm_start: start the range finder from the previous basis.
      passes: Cholesky-QR passes (1 or 2) for the blocks between power products;
        1 halves those factorisations at a cost in the weakest directions.
      eigh: the Rayleigh-Ritz `eigh` algorithm: None (the backend's default),
        "qr", or "jacobi" (GPU / TPU only).
      seed: seeds the sketches (the PRNG key kept in the optimizer state).
    """

    oversample: int = 8
    power_iters: int = 1
    warm_start: bool = True
    passes: int = 2
    eigh: Optional[str] = None
    seed: int = 0

    method = "randomized"  # not a field: the config's and describe's name for it

    def __post_init__(self):
        _int("RandomizedSVD", "oversample", self.oversample, minimum=0)
        _int("RandomizedSVD", "power_iters", self.power_iters, minimum=0)
        _bool("RandomizedSVD", "warm_start", self.warm_start)
        _int("RandomizedSVD", "passes", self.passes, minimum=1, maximum=2)
        if self.eigh not in EIGH_IMPLEMENTATIONS:
            raise ValueError(
                f"RandomizedSVD.eigh must be one of {EIGH_IMPLEMENTATIONS} (None: the "
                f"backend's default), got {self.eigh!r}"
            )
        _int("RandomizedSVD", "seed", self.seed, minimum=0)


@dataclasses.dataclass(frozen=True)
class ExactSVD:
    """Refresh a subspace with an exact (LAPACK / cuSOLVER) truncated SVD.

    Attributes:
      seed: seeds the random directions that complete a basis where the gradient
        has no energy (zero or rank-deficient gradients).
    """

    seed: int = 0

    method = "exact"

    def __post_init__(self):
        _int("ExactSVD", "seed", self.seed, minimum=0)


Refresh = Union[RandomizedSVD, ExactSVD]
_SVD_SHORTHANDS = {"randomized": RandomizedSVD, "exact": ExactSVD}


def as_refresh(svd: Union[str, Refresh], name: str = "svd") -> Refresh:
    """The refresh object `svd` names ("randomized" / "exact" or an object)."""
    if isinstance(svd, (RandomizedSVD, ExactSVD)):
        return svd
    if isinstance(svd, str) and svd in _SVD_SHORTHANDS:
        return _SVD_SHORTHANDS[svd]()
    raise ValueError(
        f"{name} must be 'randomized', 'exact', gj.RandomizedSVD(...) or gj.ExactSVD(...); "
        f"got {svd!r}"
    )


@dataclasses.dataclass(frozen=True)
class ProjectorStorage:
    """How projectors are stored: full precision, or int8 / int4 codes (Q-GaLore).

    Attributes:
      bits: 32 (full precision), 8 or 4 (packed two per byte); low-bit codes
        carry float32 absmax scales and are dequantized on use.
      group_size: values per scale along each basis vector (None: one scale per
        vector; Q-GaLore uses 256 with INT4).
      dtype: the dtype of full-precision projectors (None: the param's).
    """

    bits: int = 32
    group_size: Optional[int] = None
    dtype: Optional[Any] = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in (32, 8, 4):
            raise ValueError(f"ProjectorStorage.bits must be 32, 8 or 4; got {self.bits!r}")
        if self.group_size is not None:
            _int("ProjectorStorage", "group_size", self.group_size, minimum=1)
        object.__setattr__(self, "dtype", _dtype("ProjectorStorage", "dtype", self.dtype))
        if self.bits != 32 and self.dtype is not None:
            raise ValueError("ProjectorStorage.dtype applies to bits=32; low-bit codes are ints")


@dataclasses.dataclass(frozen=True)
class AdamOptions:
    """The Adam that `galore_adamw` runs on low-rank and plain leaves alike.

    Attributes:
      b1, b2, eps: Adam's decay rates and epsilon (optax's placement of eps).
      mu_dtype: dtype of 32-bit first moments (None: the gradient's).
      bits: 32 (optax.scale_by_adam) or 8 (block-wise 8-bit moments,
        `gj.scale_by_adam_8bit`; small leaves stay 32-bit).
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    mu_dtype: Optional[Any] = None
    bits: int = 32

    def __post_init__(self):
        _float("AdamOptions", "b1", self.b1, low=0.0, high=1.0)
        _float("AdamOptions", "b2", self.b2, low=0.0, high=1.0)
        _float("AdamOptions", "eps", self.eps, low=0.0, high=float("inf"))
        object.__setattr__(self, "mu_dtype", _dtype("AdamOptions", "mu_dtype", self.mu_dtype))
        if isinstance(self.bits, bool) or self.bits not in (32, 8):
            raise ValueError(f"AdamOptions.bits must be 32 or 8; got {self.bits!r}")
        if self.bits == 8 and self.mu_dtype is not None:
            raise ValueError("AdamOptions.mu_dtype applies to bits=32 (8-bit moments are codes)")


@dataclasses.dataclass(frozen=True)
class Tucker:
    """How `galore_adamw` treats >= 3-D tensors it does not see as stacked matrices.

    Attributes:
      rank: a float in (0, 1] (the fraction of a tensor's entries its Tucker core
        plus factors hold), an int for every mode, or a per-mode tuple (int,
        fraction of that mode, or None to leave the mode unprojected).
      svd: "exact" (default), "randomized", or a refresh object.
      modes: which modes to project (None: all).
    """

    rank: Union[int, float, Tuple[Union[int, float, None], ...]] = 0.25
    svd: Union[str, Refresh] = "exact"
    modes: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        rank = tuple(self.rank) if isinstance(self.rank, list) else self.rank
        object.__setattr__(self, "rank", rank)
        _checks.check_ranks("Tucker.rank", rank)
        object.__setattr__(self, "svd", as_refresh(self.svd, "Tucker.svd"))
        if self.modes is not None:
            object.__setattr__(self, "modes", tuple(int(m) for m in self.modes))


@dataclasses.dataclass(frozen=True)
class Labels:
    """Which parameters get which optimizer (see `gj.galore_labels`, `gj.describe`).

    Attributes:
      tree: the labels themselves ("galore" | "tensor_galore" | "adam"), a pytree
        matching the params or a callable params -> that pytree; None applies the
        structural rule.
      overrides: {regex on the param path: label}, patching the rule; the first
        matching pattern wins (dict order). Ignored when `tree` is given.
      dimension_numbers: which axes are batch axes (stacked layers): one
        `gj.DimensionNumbers` for all leaves, a pytree of them (or None), or a
        callable params -> such a pytree; None finds stacked layers by structure.
    """

    tree: Any = None
    overrides: Any = None
    dimension_numbers: Any = None

    def __post_init__(self):
        if self.overrides is not None:
            items = self.overrides.items() if hasattr(self.overrides, "items") else self.overrides
            try:
                pairs = tuple((str(k), str(v)) for k, v in items)
            except (TypeError, ValueError):
                raise TypeError(
                    f"Labels.overrides must be a dict {{regex: label}}, got {self.overrides!r}"
                ) from None
            object.__setattr__(self, "overrides", pairs)

    def override_dict(self) -> Optional[dict]:
        return None if self.overrides is None else dict(self.overrides)

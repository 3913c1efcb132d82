"""Argument checks: at construction or init, never inside a trace.

Each error names the argument, the bad value and the accepted range or the fix.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

# Arguments of the factories that must stay Python values under
# optax.inject_hyperparams (option objects are static by themselves).
STATIC_ARGS = ("rank", "update_proj_gap")
MAX_GAP = 2**31 - 1  # steps are counted in int32
ON_REFRESH = ("keep", "reset", "project")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def inject_hint(static_args: Sequence[str]) -> str:
    return f"with optax.inject_hyperparams pass static_args={tuple(static_args)!r}"


def static_int(
    name: str, value, *, minimum: int, maximum: Optional[int] = None, static_args=STATIC_ARGS
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, jax.Array):
            raise TypeError(
                f"{name} must be a static Python int, got a jax.Array; {inject_hint(static_args)}"
            )
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_rank_value(rank, name: str = "rank", static_args=STATIC_ARGS):
    """Raises a clear error unless `rank` is a positive int or a fraction in (0, 1]."""
    if isinstance(rank, jax.Array):
        raise TypeError(
            f"{name} must be a static int or float, got a jax.Array; {inject_hint(static_args)}"
        )
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{name} must be an int (> 0) or a float fraction in (0, 1], got {rank!r}")
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"{name} must be a positive int, got {rank}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ValueError(f"{name} as a fraction must be in (0, 1], got {rank}")


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_schedule(update_proj_gap, on_refresh, stagger, static_args=STATIC_ARGS) -> None:
    """Checks the refresh schedule shared by every low-rank transform."""
    static_int(
        "update_proj_gap", update_proj_gap, minimum=1, maximum=MAX_GAP, static_args=static_args
    )
    check_choice("on_refresh", on_refresh, ON_REFRESH)
    if not isinstance(stagger, bool):
        raise TypeError(f"stagger must be True or False, got {stagger!r}")


def check_base_optimizer(base_optimizer, transform: str):
    """Refuses base optimizers that need params (they run on low-rank gradients only)."""
    if base_optimizer is None:
        return
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{transform}: base_optimizer must be an optax.GradientTransformation, got "
            f"{base_optimizer!r}"
        )
    probe = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
    try:
        jax.eval_shape(lambda g: base_optimizer.update(g, base_optimizer.init(g), None), probe)
    except ValueError as e:
        if "params" in str(e):
            raise ValueError(
                f"{transform}: base_optimizer needs params (e.g. optax.adamw's weight decay), "
                "but it runs on low-rank gradients and never sees them. Use a params-free base "
                "such as optax.scale_by_adam() and put optax.add_decayed_weights after the "
                "GaLore transform (as gj.galore_adamw does)"
            ) from None
    except Exception:  # pylint: disable=broad-except
        pass  # needs other shapes or extra args: it will tell at its first update


def check_leaf_dtype(transform: str, path: str, leaf):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{transform}: leaf '{path}' has dtype {dtype}; GaLore needs float or complex leaves. "
            "Keep integer/bool leaves out of the optimizer (optax.masked / optax.partition, or "
            "galore_adamw's labels)."
        )


def check_scalar_arg(name: str, value) -> None:
    """`grad_scale` / `update_scale` must be scalars (None: 1), checked when traced."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape == () and dtype is not None and jnp.issubdtype(dtype, jnp.number):
        return
    got = f"an array of shape {shape}" if shape is not None else type(value).__name__
    raise ValueError(f"{name} must be a scalar (a number or a 0-d array), got {got}")


def check_max_grad_norm(name, max_grad_norm):
    if max_grad_norm is None or isinstance(max_grad_norm, jax.Array):
        return
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"{name}: max_grad_norm must be a float or None, got {max_grad_norm!r}")
    if not max_grad_norm > 0:
        raise ValueError(
            f"{name}: max_grad_norm must be > 0, got {max_grad_norm!r} (None: no clipping)"
        )


def check_ranks(name, rank, static_args=STATIC_ARGS):
    for i, r in enumerate(rank) if isinstance(rank, (tuple, list)) else [(None, rank)]:
        if r is not None or i is None:
            check_rank_value(r, name if i is None else f"{name}[{i}]", static_args)


def check_option(name: str, value, cls):
    """`value` if it is a `cls` option object, `cls()` for None; else a clear error."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be None or gj.{cls.__name__}(...), got {value!r}")
    return value

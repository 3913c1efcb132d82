"""Fourier Neural Operator (Li et al., 2021) in Flax NNX, 1-D and 2-D.

The FNO maps a function sampled on a grid to another function on the same grid:

    v_0 = P(x, grid)                                   lifting, pointwise
    v_{l+1} = sigma(K_l v_l + W_l v_l),  l < L - 1       Fourier layers
    v_L     =       K_{L-1} v_{L-1} + W_{L-1} v_{L-1}    (no activation after the last)
    y = Q(v_L)                                         projection MLP, pointwise

with ``W_l`` a pointwise linear map (a 1x1 convolution) and ``K_l`` the spectral
convolution ``K v = IFFT(R . FFT(v))`` whose weights ``R`` act on the lowest
``modes`` frequencies only:
``(K v)^(k) = sum_i v^_i(k) R_{i,o}(k)`` for kept ``k``, 0 for the rest.
Every weight is defined per frequency, not per grid point, so the same model
evaluates at any resolution that can hold its modes.

The spectral weights are complex ``nnx.Param`` s of shape
``(in_channels, out_channels, *modes)`` (names start with ``spectral_weight``),
the 3-D / 4-D tensors Tensor-GaLore projects with a Tucker decomposition.

Complex gradients: for a real loss ``L`` of ``z = x + i y``, ``jax.grad`` returns
``dL/dx - i dL/dy``, the conjugate of the steepest-ascent direction (PyTorch
returns ``dL/dx + i dL/dy``). Optax applies ``p - lr * g`` unchanged, so feeding
raw JAX gradients to an optax optimizer ascends in the imaginary parts. Apply
:func:`conjugate_complex_grads` first (a no-op on real leaves).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> config = FNOConfig(dim=2, in_channels=1, out_channels=1, width=8, modes=4)
    >>> model = FNO(config, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 16, 16, 1))).shape
    (2, 16, 16, 1)

References:
    Li, Kovachki, Azizzadenesheli, Liu, Bhattacharya, Stuart, Anandkumar.
    "Fourier Neural Operator for Parametric Partial Differential Equations",
    ICLR 2021. https://arxiv.org/abs/2010.08895
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "FNO",
    "FNOConfig",
    "SpectralConv",
    "conjugate_complex_grads",
    "relative_l2",
]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Exact (erf) GELU, as torch.nn.functional.gelu in the reference FNO.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}
_REAL_PARAM_DTYPES = ("float32", "float64", "bfloat16")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"FNOConfig.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FNOConfig:
    """Shape of a Fourier Neural Operator.

    Attributes:
      dim: Number of spatial dimensions, 1 or 2.
      in_channels: Channels of the input function (without grid coordinates).
      out_channels: Channels of the output function.
      width: Hidden channels of the Fourier layers.
      modes: Kept Fourier modes per spatial axis: an int for all axes or a tuple
        of length ``dim``. In 2-D, ``modes[0]`` low frequencies are kept on each
        side (positive and negative) of the full-FFT axis and ``modes[1]`` of the
        rfft axis, so the resolution must satisfy ``n_x >= 2 modes[0]`` and
        ``n_y // 2 + 1 >= modes[1]``; in 1-D ``n // 2 + 1 >= modes``.
      num_layers: Number of Fourier layers.
      lifting_channels: Hidden width of a two-layer lifting MLP; None lifts with
        one linear layer (the original FNO).
      projection_channels: Hidden width of the two-layer projection MLP.
      activation: "gelu" (default), "relu", "silu" or "tanh".
      append_grid: Append the grid coordinates ``linspace(0, 1, n)`` per axis to
        the input channels (customary; breaks translation equivariance on purpose).
      padding: Zero points appended at the end of every spatial axis after
        lifting and removed before projection, for non-periodic problems (the
        FNO paper pads Darcy by 9). Changes the physical padding with resolution.
      param_dtype: Real parameter dtype, "float32" or "bfloat16" (what
        ``train.py``'s ``model.param_dtype`` offers); spectral weights are
        complex64 either way. Library use may also pass "float64" (complex128
        spectral weights), which needs 64-bit JAX,
        ``jax.config.update("jax_enable_x64", True)``, before the config is made.
    """

    dim: int = 2
    in_channels: int = 1
    out_channels: int = 1
    width: int = 32
    modes: int | tuple[int, ...] = 12
    num_layers: int = 4
    lifting_channels: int | None = None
    projection_channels: int = 128
    activation: str = "gelu"
    append_grid: bool = True
    padding: int = 0
    param_dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.modes, list):  # YAML configs give lists
            object.__setattr__(self, "modes", tuple(self.modes))
        if self.dim not in (1, 2) or isinstance(self.dim, bool):
            raise ValueError(f"FNOConfig.dim must be 1 or 2, got {self.dim!r}")
        for name in ("in_channels", "out_channels", "width", "num_layers", "projection_channels"):
            _positive_int(name, getattr(self, name))
        if self.lifting_channels is not None:
            _positive_int("lifting_channels", self.lifting_channels)
        modes = self.modes if isinstance(self.modes, tuple) else (self.modes,) * self.dim
        if len(modes) != self.dim or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in modes
        ):
            raise ValueError(
                f"FNOConfig.modes must be a positive int or a tuple of {self.dim} positive "
                f"ints, got {self.modes!r}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"FNOConfig.activation must be one of {sorted(_ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if not isinstance(self.padding, int) or isinstance(self.padding, bool) or self.padding < 0:
            raise ValueError(f"FNOConfig.padding must be an int >= 0, got {self.padding!r}")
        if str(jnp.dtype(self.param_dtype)) not in _REAL_PARAM_DTYPES:
            raise ValueError(
                f"FNOConfig.param_dtype must be one of {_REAL_PARAM_DTYPES}, "
                f"got {self.param_dtype!r}"
            )
        if jnp.dtype(self.param_dtype) == jnp.float64 and not jax.config.jax_enable_x64:
            # Without x64 JAX would silently make float32 / complex64 params.
            raise ValueError(
                "FNOConfig.param_dtype='float64' needs 64-bit JAX: call "
                "jax.config.update('jax_enable_x64', True) first (train.py offers float32 "
                "and bfloat16 only)"
            )

    @property
    def modes_per_axis(self) -> tuple[int, ...]:
        """``modes`` as a tuple of length ``dim``."""
        return self.modes if isinstance(self.modes, tuple) else (self.modes,) * self.dim


def _complex_dtype(real_dtype) -> jnp.dtype:
    # There is no complex bfloat16; bf16 models keep complex64 spectral weights.
    return jnp.dtype(jnp.complex128 if jnp.dtype(real_dtype) == jnp.float64 else jnp.complex64)


def _fft_real_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "scale"))
def _spectral_init(key, *, shape, dtype, scale):
    """Reference FNO init: ``scale * (U[0,1) + i U[0,1))``. Jitted: one compile per shape."""
    real = jnp.finfo(dtype).dtype  # complex64 -> float32
    re_key, im_key = jax.random.split(key)
    re = jax.random.uniform(re_key, shape, real)
    im = jax.random.uniform(im_key, shape, real)
    return (scale * (re + 1j * im)).astype(dtype)


class SpectralConv(nnx.Module):
    """Spectral convolution ``K v = IRFFT(R . RFFT(v))`` on the lowest modes.

    Input and output are channels-last, ``(batch, *spatial, channels)``.

    1-D: ``v^ = rfft(v)`` has ``n // 2 + 1`` frequencies ``k = 0..n/2``; the first
    ``modes`` are multiplied, ``w^(k)_o = sum_i v^(k)_i R_{i,o,k}``, the rest set to 0,
    and ``irfft`` returns ``n`` points. Weight ``spectral_weight``: ``(in, out, modes)``.

    2-D: ``rfft2`` over (x, y) keeps the full set of ``k_x`` (positive then
    negative) and ``k_y = 0..n_y/2``. The low frequencies are the two corners
    ``k_x in [0, m_x)`` and ``k_x in [-m_x, 0)``, each with ``k_y in [0, m_y)``;
    each corner has its own weight, ``spectral_weight_pos`` and
    ``spectral_weight_neg``, both ``(in, out, m_x, m_y)`` (as in the reference FNO).

    Initialisation follows the reference FNO: real and imaginary parts uniform on
    ``[0, 1 / (in * out))``.

    Args:
      in_channels: Input channels.
      out_channels: Output channels.
      modes: Kept modes per spatial axis (length 1 or 2).
      param_dtype: Real dtype whose complex counterpart stores the weights.
      rngs: Source of the ``params`` key.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modes: tuple[int, ...],
        *,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        modes = tuple(modes)
        if len(modes) not in (1, 2):
            raise ValueError(f"modes must have length 1 or 2, got {modes!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.modes = modes
        shape = (in_channels, out_channels, *modes)
        init = functools.partial(
            _spectral_init,
            shape=shape,
            dtype=_complex_dtype(param_dtype),
            scale=1.0 / (in_channels * out_channels),
        )
        if len(modes) == 1:
            self.spectral_weight = nnx.Param(init(rngs.params()))
        else:
            self.spectral_weight_pos = nnx.Param(init(rngs.params()))
            self.spectral_weight_neg = nnx.Param(init(rngs.params()))

    def _check_resolution(self, spatial: tuple[int, ...]) -> None:
        if len(spatial) != len(self.modes):
            raise ValueError(
                f"SpectralConv with modes={self.modes} expects {len(self.modes)} spatial "
                f"axes, got input spatial shape {spatial}"
            )
        if len(spatial) == 1:
            (n,), (m,) = spatial, self.modes
            if m > n // 2 + 1:
                raise ValueError(
                    f"modes={m} exceeds the {n // 2 + 1} rfft frequencies of resolution {n}"
                )
        else:
            (nx, ny), (mx, my) = spatial, self.modes
            if 2 * mx > nx:
                raise ValueError(
                    f"modes[0]={mx} needs resolution n_x >= {2 * mx} (positive and "
                    f"negative frequencies), got n_x={nx}"
                )
            if my > ny // 2 + 1:
                raise ValueError(
                    f"modes[1]={my} exceeds the {ny // 2 + 1} rfft frequencies of "
                    f"resolution n_y={ny}"
                )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the spectral convolution to ``x`` of shape ``(batch, *spatial, in)``."""
        spatial = x.shape[1:-1]
        self._check_resolution(spatial)
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[-1]}")
        # FFTs have no bfloat16 kernels; transform in f32 (f64 for f64 inputs).
        x_real = x.astype(_fft_real_dtype(x.dtype))
        if len(spatial) == 1:
            (n,), (m,) = spatial, self.modes
            x_hat = jnp.fft.rfft(x_real, axis=1)  # (b, n//2+1, in)
            weight = self.spectral_weight[...]
            kept = jnp.einsum("bki,iok->bko", x_hat[:, :m].astype(weight.dtype), weight)
            out_hat = jnp.pad(kept, ((0, 0), (0, n // 2 + 1 - m), (0, 0)))
            y = jnp.fft.irfft(out_hat, n=n, axis=1)
        else:
            (nx, ny), (mx, my) = spatial, self.modes
            x_hat = jnp.fft.rfft2(x_real, axes=(1, 2))  # (b, nx, ny//2+1, in)
            w_pos = self.spectral_weight_pos[...]
            w_neg = self.spectral_weight_neg[...]
            contract = "bxyi,ioxy->bxyo"
            low = jnp.einsum(contract, x_hat[:, :mx, :my].astype(w_pos.dtype), w_pos)
            high = jnp.einsum(contract, x_hat[:, nx - mx :, :my].astype(w_neg.dtype), w_neg)
            middle = jnp.zeros((x.shape[0], nx - 2 * mx, my, self.out_channels), low.dtype)
            out_hat = jnp.concatenate([low, middle, high], axis=1)
            out_hat = jnp.pad(out_hat, ((0, 0), (0, 0), (0, ny // 2 + 1 - my), (0, 0)))
            y = jnp.fft.irfft2(out_hat, s=(nx, ny), axes=(1, 2))
        return y.astype(x.dtype)


def _grid_coordinates(spatial: tuple[int, ...], batch: int, dtype) -> jax.Array:
    """``(batch, *spatial, dim)`` coordinates ``linspace(0, 1, n)`` per axis."""
    axes = [jnp.linspace(0.0, 1.0, n, dtype=dtype) for n in spatial]
    grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)
    return jnp.broadcast_to(grid, (batch, *grid.shape))


class FNO(nnx.Module):
    """Fourier Neural Operator: lifting, Fourier layers, projection.

    ``__call__`` maps ``(batch, *spatial, in_channels)`` to
    ``(batch, *spatial, out_channels)`` for any resolution that holds the modes
    (see :class:`FNOConfig`).

    Args:
      config: The model shape.
      rngs: Source of the ``params`` keys.
    """

    def __init__(self, config: FNOConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dtype = jnp.dtype(c.param_dtype)
        linear = lambda i, o: nnx.Linear(i, o, param_dtype=dtype, rngs=rngs)  # noqa: E731
        lift_in = c.in_channels + (c.dim if c.append_grid else 0)
        if c.lifting_channels is None:
            self.lifting = nnx.List([linear(lift_in, c.width)])
        else:
            self.lifting = nnx.List(
                [linear(lift_in, c.lifting_channels), linear(c.lifting_channels, c.width)]
            )
        self.spectral = nnx.List(
            [
                SpectralConv(c.width, c.width, c.modes_per_axis, param_dtype=dtype, rngs=rngs)
                for _ in range(c.num_layers)
            ]
        )
        self.skip = nnx.List([linear(c.width, c.width) for _ in range(c.num_layers)])
        self.projection = nnx.List(
            [linear(c.width, c.projection_channels), linear(c.projection_channels, c.out_channels)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if x.ndim != c.dim + 2 or x.shape[-1] != c.in_channels:
            raise ValueError(
                f"FNO expects input (batch, {', '.join(['n'] * c.dim)}, {c.in_channels}), "
                f"got shape {x.shape}"
            )
        act = _ACTIVATIONS[c.activation]
        spatial = x.shape[1:-1]
        if c.append_grid:
            x = jnp.concatenate([x, _grid_coordinates(spatial, x.shape[0], x.dtype)], axis=-1)
        for i, layer in enumerate(self.lifting):
            x = layer(x)
            if i < len(self.lifting) - 1:
                x = act(x)
        if c.padding:
            x = jnp.pad(x, [(0, 0)] + [(0, c.padding)] * c.dim + [(0, 0)])
        for i, (spectral, skip) in enumerate(zip(self.spectral, self.skip)):
            x = spectral(x) + skip(x)
            if i < c.num_layers - 1:
                x = act(x)
        if c.padding:
            x = x[(slice(None), *(slice(0, n) for n in spatial))]
        x = act(self.projection[0](x))
        return self.projection[1](x)


def relative_l2(
    pred: jax.Array, target: jax.Array, *, reduction: str = "mean", eps: float = 0.0
) -> jax.Array:
    """Relative L2 error per sample, ``||pred_b - target_b|| / ||target_b||``.

    Norms are over all non-batch axes (grid and channels); the grid spacing
    cancels, so the value does not depend on the resolution.

    Args:
      pred: ``(batch, ...)`` predictions.
      target: Targets of the same shape.
      reduction: "mean" (the FNO paper's metric and loss), "sum" or "none".
      eps: Added to the target norm, for all-zero targets.

    Returns:
      A scalar, or ``(batch,)`` for reduction "none".
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    batch = pred.shape[0]
    diff = jnp.linalg.norm((pred - target).reshape(batch, -1), axis=1)
    norm = jnp.linalg.norm(target.reshape(batch, -1), axis=1)
    per_sample = diff / (norm + eps)
    if reduction == "mean":
        return jnp.mean(per_sample)
    if reduction == "sum":
        return jnp.sum(per_sample)
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def conjugate_complex_grads(grads: Any) -> Any:
    """Conjugates complex leaves so optax's ``p - lr * g`` descends.

    ``jax.grad`` of a real loss w.r.t. ``z = x + i y`` is ``dL/dx - i dL/dy``;
    its conjugate is the steepest-ascent direction that gradient-based
    optimizers expect (and what PyTorch returns). Real leaves are unchanged.
    """
    return jax.tree.map(lambda g: jnp.conj(g) if jnp.iscomplexobj(g) else g, grads)

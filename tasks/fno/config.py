"""The config of ``task: fno``: the FNO ``model`` section, the PDE ``data`` section
and :class:`FNOConfig`, the run config that holds them (``training.config.Config``'s
task-agnostic sections, plus these).

The ``model`` section is what the user writes, not ``models.fno.FNOConfig``: the
model's ``dim`` and channels come from ``data.dataset`` (burgers: 1-D, darcy: 2-D),
so ``modes`` can only be checked against the grid here, in :class:`FNOConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from training.config import _SECTION, Bool, Config, Float, Int, Pos, _fail, _Section


@dataclass(config=_SECTION)
class FNOModelConfig(_Section):
    """Fourier Neural Operator shape for ``task: fno``; becomes a ``models.fno.FNOConfig``
    (``tasks.fno.task.fno_config``).

    The spatial dimension comes from the data (burgers: 1-D, darcy: 2-D).
    ``modes`` is an int (all axes) or a list with one entry per axis; in 2-D,
    ``modes[0]`` frequencies are kept on each side of the full-FFT axis, so
    the resolution must be >= 2 * modes[0] (and >= 2 * (modes[1] - 1)).
    """

    width: Pos = 32
    modes: Union[Int, list[Int]] = 12
    num_layers: Pos = 4
    lifting_channels: Optional[Pos] = None  # None: one linear lifting layer
    projection_channels: Pos = 128
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    append_grid: Bool = True  # append grid coordinates to the input channels
    padding: Int = Field(0, ge=0)  # zero points appended per spatial axis (non-periodic)
    param_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass(config=_SECTION)
class PDEDataConfig(_Section):
    """PDE data for ``task: fno``, generated at start-up by ``tasks.fno.pde``.

    ``dataset``: ``burgers`` (1-D viscous Burgers, ``u(., 0) -> u(., t_final)``)
    or ``darcy`` (2-D Darcy flow, permeability -> pressure). ``n_train + n_test``
    samples are drawn from ``seed`` (fixed, independent of the run's seed, so
    runs with different model seeds or optimizers see the same data) and split.
    Inputs and outputs are normalised with ``UnitGaussianNormalizer`` fitted on
    the training split (``pointwise``: one mean/std per grid point, as in the
    FNO paper; otherwise per channel). The whole test split is evaluated
    (``eval_batches`` is not used) and reported as ``val_l2``, the mean
    relative L2 error. ``eval_resolutions``: grids at which the same test
    samples are also generated and evaluated (zero-shot super-resolution),
    reported as ``val_l2_res<N>``; checked against the generator and the model
    in ``tasks.fno.task.check_eval_resolutions``.
    """

    dataset: Literal["burgers", "darcy"] = "darcy"
    n_train: Pos = 256
    n_test: Pos = 64
    resolution: Pos = 32
    seed: Int = Field(0, ge=0)
    viscosity: Float = Field(0.1, gt=0)  # burgers: nu (FNO paper 0.1; 0.01 has steeper fronts)
    t_final: Float = Field(1.0, gt=0)  # burgers: T
    pointwise_normalizer: Bool = False
    eval_resolutions: list[Pos] = dataclasses.field(default_factory=list)

    @model_validator(mode="after")
    def _grid(self) -> PDEDataConfig:
        res = self.resolution
        _fail(
            self.dataset == "burgers" and res % 2,
            f"data.resolution must be even for burgers, got {res}",
        )
        _fail(
            self.dataset == "darcy" and res < 3,
            f"data.resolution must be >= 3 for darcy, got {res}",
        )
        return self


@dataclass(config=_SECTION)
class FNOConfig(Config):
    """``task: fno``: a Fourier Neural Operator on generated PDE data."""

    task: Literal["fno"] = "fno"
    model: FNOModelConfig = dataclasses.field(default_factory=FNOModelConfig)
    data: PDEDataConfig = dataclasses.field(default_factory=PDEDataConfig)

    def build_task(self):
        """The FNO task (generates the PDE data): ``tasks.fno.task.build_fno_task``."""
        from tasks.fno.task import build_fno_task  # lazily: it imports jax and the model

        return build_fno_task(self)

    @model_validator(mode="after")
    def _fit(self) -> FNOConfig:
        model, data = self.model, self.data
        _fail(
            data.n_train < self.batch_size,
            f"data.n_train ({data.n_train}) must be >= batch_size ({self.batch_size})",
        )
        dim = 1 if data.dataset == "burgers" else 2
        modes = model.modes if isinstance(model.modes, list) else [model.modes] * dim
        _fail(
            len(modes) != dim or min(modes) <= 0,
            f"model.modes must be a positive int or a list of {dim} positive ints for "
            f"data.dataset={data.dataset!r}, got {model.modes!r}",
        )
        n = data.resolution + model.padding  # the spectral layers see the padded grid
        grid = f"(data.resolution={data.resolution}, model.padding={model.padding})"
        if dim == 1:
            _fail(
                modes[0] > n // 2 + 1,
                f"model.modes ({modes[0]}) must be <= "
                f"{n // 2 + 1}, the rfft frequencies of the grid {grid}",
            )
        else:
            _fail(
                2 * modes[0] > n or modes[1] > n // 2 + 1,
                f"model.modes ({model.modes!r}) do not fit the grid: need 2 * modes[0] "
                f"<= {n} and modes[1] <= {n // 2 + 1} {grid}",
            )
        return self

"""Operator learning with the Fourier Neural Operator on generated PDE data.

``task: fno`` trains :class:`models.fno.FNO` on 1-D Burgers or 2-D Darcy flow
pairs generated at start-up by :mod:`training.pde` (deterministic by
``data.seed``; nothing is downloaded). Inputs and outputs are normalised with
``UnitGaussianNormalizer`` fitted on the training split; the model sees the
normalised input and its output is decoded before the loss, so the training
loss and ``val_l2`` are relative L2 errors in physical units (the FNO paper's
loss and metric).

Optimizers (``optimizer.name``):
  ``adamw``          AdamW on every parameter.
  ``galore``         matrix GaLore on the spectral weights only, each reshaped to
                     ``(in, out * modes...)`` (the Tensor-GaLore paper's GaLore
                     baseline); the pointwise layers get plain AdamW.
  ``tensor_galore``  Tucker (Tensor-GaLore) on all modes of the complex
                     spectral weights; the pointwise layers get plain AdamW.

Complex gradients are conjugated before the optimizer
(:func:`models.fno.conjugate_complex_grads`): ``jax.grad`` of a real loss
w.r.t. complex weights is the conjugate of the descent direction optax expects.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import fno
from training import pde
from training.config import Config, ConfigError, OptimizerConfig
from training.data import EpochBatchIterator, process_slice
from training.task import Task

# Matrix GaLore on the spectral weights only (first matching regex wins).
GALORE_SPECTRAL_ONLY = {"spectral_weight": "galore", ".": "adam"}


def fno_config(config: Config) -> fno.FNOConfig:
    """The model's ``FNOConfig`` from the ``model`` section and the dataset."""
    m = config.model
    dim = 1 if config.data.dataset == "burgers" else 2
    modes = tuple(m.modes) if isinstance(m.modes, list) else m.modes
    try:
        return fno.FNOConfig(
            dim=dim,
            in_channels=1,
            out_channels=1,
            width=m.width,
            modes=modes,
            num_layers=m.num_layers,
            lifting_channels=m.lifting_channels,
            projection_channels=m.projection_channels,
            activation=m.activation,
            append_grid=m.append_grid,
            padding=m.padding,
            param_dtype=m.param_dtype,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


@dataclasses.dataclass
class PDEData:
    """Generated pairs, split and normalised (host numpy arrays)."""

    x_train: np.ndarray  # encoded inputs, (n_train, *grid, 1)
    y_train: np.ndarray  # raw outputs
    x_test: np.ndarray  # encoded with the training normaliser
    y_test: np.ndarray
    y_normalizer: pde.UnitGaussianNormalizer  # decodes model outputs
    seconds: float  # generation time


def load_pde_data(data_cfg: Any) -> PDEData:
    """Generates ``n_train + n_test`` pairs from ``data.seed`` and normalises them."""
    start = time.perf_counter()
    n = data_cfg.n_train + data_cfg.n_test
    if data_cfg.dataset == "burgers":
        x, y = pde.burgers_dataset(
            n,
            data_cfg.resolution,
            viscosity=data_cfg.viscosity,
            t_final=data_cfg.t_final,
            seed=data_cfg.seed,
        )
    else:
        x, y = pde.darcy_dataset(n, data_cfg.resolution, seed=data_cfg.seed)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ConfigError(
            f"data: the {data_cfg.dataset} generator produced non-finite "
            "values; change data.resolution / data.viscosity"
        )
    k = data_cfg.n_train
    fit = lambda a: pde.UnitGaussianNormalizer.fit(  # noqa: E731
        a, pointwise=data_cfg.pointwise_normalizer
    )
    x_norm, y_norm = fit(x[:k]), fit(y[:k])
    y_norm = jax.tree.map(np.asarray, y_norm)
    encode = lambda a: np.asarray(x_norm.encode(a), np.float32)  # noqa: E731
    return PDEData(
        x_train=encode(x[:k]),
        y_train=y[:k],
        x_test=encode(x[k:]),
        y_test=y[k:],
        y_normalizer=y_norm,
        seconds=time.perf_counter() - start,
    )


class ArrayBatchIterator(EpochBatchIterator):
    """Endless, seeded, resumable shuffled batches over in-memory arrays.

    Each epoch is a permutation of the samples drawn from ``(seed, epoch)``
    (see ``training.data.EpochBatchIterator``).

    Yields:
        ``{"x": [B/n, ...], "y": [B/n, ...]}`` for ``n`` processes.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        global_batch_size: int,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if global_batch_size > len(x):
            raise ValueError(
                f"global_batch_size={global_batch_size} is larger than the "
                f"{len(x)} training samples"
            )
        self._x, self._y = x, y
        super().__init__(
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def _order_for_epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self._x))

    def _batch(self, rows: np.ndarray) -> dict:
        return {"x": self._x[rows], "y": self._y[rows]}


def eval_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[dict]:
    """The whole test set in global batches of ``batch_size`` (last one padded).

    Each batch carries a per-sample ``weight`` (0 for padding) scaled so that
    the mean over batches of ``mean(weight * error)`` is the mean error over
    the real samples, which is what ``train.py``'s ``evaluate`` computes.
    """
    first_row, rows = process_slice(batch_size, process_index, process_count)
    n = len(x)
    num_batches = -(-n // batch_size)
    total = num_batches * batch_size
    index = np.concatenate([np.arange(n), np.zeros(total - n, np.int64)])
    weight = np.where(np.arange(total) < n, total / n, 0.0).astype(np.float32)
    batches = []
    for b in range(num_batches):
        sel = slice(b * batch_size + first_row, b * batch_size + first_row + rows)
        batches.append({"x": x[index[sel]], "y": y[index[sel]], "weight": weight[sel]})
    return batches


def build_fno_task(config: Config) -> Task:
    """Generates the PDE data and describes the FNO task.

    Raises:
        ConfigError: model modes that do not fit the grid, bad data sizes.
    """
    model_config = fno_config(config)
    data = load_pde_data(config.data)
    micro_batch = config.batch_size // config.grad_accum_steps
    try:
        train_iterator = ArrayBatchIterator(
            data.x_train, data.y_train, global_batch_size=config.batch_size, seed=config.seed
        )
        test_batches = eval_batches(data.x_test, data.y_test, micro_batch)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    y_mean = jnp.asarray(data.y_normalizer.mean)
    y_scale = jnp.asarray(data.y_normalizer.scale)

    def predict(model, x):
        return model(x) * y_scale + y_mean  # decode to physical units

    def loss_fn(model, batch):
        return fno.relative_l2(predict(model, batch["x"]), batch["y"])

    def eval_loss_fn(model, batch):
        errors = fno.relative_l2(predict(model, batch["x"]), batch["y"], reduction="none")
        return jnp.mean(errors * batch["weight"])

    def optimizer_defaults(cfg: OptimizerConfig) -> OptimizerConfig:
        if cfg.name == "galore" and cfg.label_overrides is None:
            return dataclasses.replace(cfg, label_overrides=dict(GALORE_SPECTRAL_ONLY))
        return cfg

    def replicated_specs(params, rules):
        del rules  # the FNO is small: replicate it, split only the batch
        return jax.tree.map(lambda _: P(), _pure(params))

    def no_layer_axes(params):
        return jax.tree.map(lambda _: None, _pure(params))

    grid = "x".join([str(config.data.resolution)] * model_config.dim)
    return Task(
        name="fno",
        make_model=lambda rngs: fno.FNO(model_config, rngs=rngs),
        partition_specs=replicated_specs,
        default_rules=(),
        layer_axes=no_layer_axes,
        loss_fn=loss_fn,
        eval_loss_fn=eval_loss_fn,
        summarize_eval=lambda mean_l2: {"val_l2": mean_l2},
        train_iterator=train_iterator,
        eval_batches=lambda: test_batches,
        units_per_batch=config.batch_size,
        units_name="samples",
        description=(
            f"data: {config.data.dataset} {grid} | {len(data.x_train)} train / "
            f"{len(data.x_test)} test samples | seed {config.data.seed} | generated in "
            f"{data.seconds:.1f} s"
        ),
        postprocess_grads=fno.conjugate_complex_grads,
        optimizer_defaults=optimizer_defaults,
    )


def _pure(params):
    return nnx.as_pure(params)


def trivial_l2(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Test relative L2 of predicting the training mean for every sample."""
    mean = y_train.mean(axis=0, keepdims=True)
    diff = (y_test - mean).reshape(len(y_test), -1)
    return float(
        np.mean(
            np.linalg.norm(diff, axis=1) / np.linalg.norm(y_test.reshape(len(y_test), -1), axis=1)
        )
    )

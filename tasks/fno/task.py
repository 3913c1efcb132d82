"""Operator learning with the Fourier Neural Operator on generated PDE data.

``task: fno`` trains :class:`models.fno.FNO` on 1-D Burgers or 2-D Darcy flow
pairs generated at start-up by :mod:`tasks.fno.pde` (deterministic by
``data.seed``; nothing is downloaded). Inputs and outputs are normalised with
``UnitGaussianNormalizer`` fitted on the training split; the model sees the
normalised input and its output is decoded before the loss, so the training
loss and ``val_l2`` are relative L2 errors in physical units (the FNO paper's
loss and metric).

Zero-shot super-resolution: ``data.eval_resolutions: [64, ...]`` also generates
the test split at each of those grids (the same samples of ``data.seed``, the
same coefficient fields, solved on the other grid) and reports the trained
model's relative L2 there as ``val_l2_res64`` ... next to ``val_l2``. Inputs at
every grid are encoded with the training normaliser, so it must be the
per-channel one (``data.pointwise_normalizer: false``).

Resuming needs the same training data: the iterator state saved with each
checkpoint records the data settings (:data:`TRAINING_DATA_KEYS`), and a run
whose ``data.resolution`` (or seed, size, ...) differs refuses to continue.

Optimizers (``optimizer.name``):
  ``adamw``          AdamW on every parameter.
  ``galore``         matrix GaLore on the spectral weights only, each reshaped to
                     ``(in, out * modes...)`` (the Tensor-GaLore paper's GaLore
                     baseline); the pointwise layers get plain AdamW.
  ``tensor_galore``  Tucker (Tensor-GaLore) on all modes of the complex
                     spectral weights; the pointwise layers get plain AdamW.

Complex gradients are conjugated before the optimizer
(:func:`galore_jax.conjugate_complex_grads`): ``jax.grad`` of a real loss
w.r.t. complex weights is the conjugate of the descent direction optax expects.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from models import fno
from tasks.fno import pde
from training.config import Config, ConfigError, OptimizerConfig
from training.data import EpochBatchIterator, process_slice
from training.task import Task

# Matrix GaLore on the spectral weights only (first matching regex wins).
GALORE_SPECTRAL_ONLY = {"spectral_weight": "galore", ".": "adam"}

# ``data`` settings that fix the training arrays; a checkpoint's data stream
# continues only on the same values (the burgers ones only for burgers).
TRAINING_DATA_KEYS = ("dataset", "resolution", "n_train", "seed", "pointwise_normalizer")
BURGERS_DATA_KEYS = ("viscosity", "t_final")


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
    x_normalizer: pde.UnitGaussianNormalizer  # encodes inputs (any grid if not pointwise)
    y_normalizer: pde.UnitGaussianNormalizer  # decodes model outputs
    seconds: float  # generation time


def generate_pairs(data_cfg: Any, resolution: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start..n_train+n_test-1`` of ``data.seed`` on a ``resolution`` grid.

    The same sample index is the same problem (initial condition / permeability)
    at every resolution; only the grid it is sampled and solved on changes.
    """
    n = data_cfg.n_train + data_cfg.n_test
    if data_cfg.dataset == "burgers":
        x, y = pde.burgers_dataset(
            n,
            resolution,
            viscosity=data_cfg.viscosity,
            t_final=data_cfg.t_final,
            seed=data_cfg.seed,
            start=start,
        )
    else:
        x, y = pde.darcy_dataset(n, resolution, seed=data_cfg.seed, start=start)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ConfigError(
            f"data: the {data_cfg.dataset} generator produced non-finite values at "
            f"resolution {resolution}; change data.resolution / data.eval_resolutions / "
            "data.viscosity"
        )
    return x, y


def load_pde_data(data_cfg: Any) -> PDEData:
    """Generates ``n_train + n_test`` pairs from ``data.seed`` and normalises them."""
    start = time.perf_counter()
    x, y = generate_pairs(data_cfg, data_cfg.resolution)
    k = data_cfg.n_train
    fit = lambda a: pde.UnitGaussianNormalizer.fit(  # noqa: E731
        a, pointwise=data_cfg.pointwise_normalizer
    )
    x_norm = jax.tree.map(np.asarray, fit(x[:k]))
    y_norm = jax.tree.map(np.asarray, fit(y[:k]))
    return PDEData(
        x_train=_encode(x_norm, x[:k]),
        y_train=y[:k],
        x_test=_encode(x_norm, x[k:]),
        y_test=y[k:],
        x_normalizer=x_norm,
        y_normalizer=y_norm,
        seconds=time.perf_counter() - start,
    )


def load_test_set(data_cfg: Any, resolution: int, x_normalizer) -> tuple[np.ndarray, np.ndarray]:
    """The test split (samples ``n_train..``) on a ``resolution`` grid: encoded x, raw y."""
    x, y = generate_pairs(data_cfg, resolution, start=data_cfg.n_train)
    return _encode(x_normalizer, x), y


def _encode(normalizer, a: np.ndarray) -> np.ndarray:
    return np.asarray(normalizer.encode(a), np.float32)


def check_eval_resolutions(resolutions: Any, data_cfg: Any, model_cfg: Any) -> tuple[int, ...]:
    """Validates ``data.eval_resolutions``; returns the grids as a tuple of ints.

    Each entry must be a grid the generator makes (burgers: even; darcy: >= 3
    nodes), hold the model's modes (like ``data.resolution``, with
    ``model.padding``), and appear once. Grids other than ``data.resolution``
    need the per-channel normaliser (a pointwise one is fitted on the training
    grid only).

    Raises:
        ConfigError: naming ``data.eval_resolutions`` and the offending entry.
    """
    key = "data.eval_resolutions"
    if resolutions is None:
        return ()
    if not isinstance(resolutions, (list, tuple)):
        raise ConfigError(f"{key} must be a list of grid sizes, e.g. [64], got {resolutions!r}")
    dim = 1 if data_cfg.dataset == "burgers" else 2
    modes = model_cfg.modes if isinstance(model_cfg.modes, list) else [model_cfg.modes] * dim
    seen = set()
    for res in resolutions:
        if not isinstance(res, (int, np.integer)) or isinstance(res, bool) or res < 1:
            raise ConfigError(f"{key} entries must be positive ints, got {res!r}")
        res = int(res)
        if res in seen:
            raise ConfigError(f"{key} lists {res} twice")
        seen.add(res)
        if data_cfg.dataset == "burgers" and res % 2:
            raise ConfigError(f"{key}: the burgers generator needs even grids, got {res}")
        if data_cfg.dataset == "darcy" and res < 3:
            raise ConfigError(f"{key}: the darcy generator needs >= 3 nodes per side, got {res}")
        n = res + model_cfg.padding  # the spectral layers see the padded grid
        if dim == 1:
            too_small = modes[0] > n // 2 + 1
        else:
            too_small = 2 * modes[0] > n or modes[1] > n // 2 + 1
        if too_small:
            raise ConfigError(
                f"{key}: the grid {res} (model.padding={model_cfg.padding}) cannot hold "
                f"model.modes={model_cfg.modes!r}"
            )
        if res != data_cfg.resolution and data_cfg.pointwise_normalizer:
            raise ConfigError(
                f"{key}: grid {res} differs from data.resolution={data_cfg.resolution}, but "
                "data.pointwise_normalizer=true fits one mean/std per training grid point; "
                "set data.pointwise_normalizer=false"
            )
    return tuple(int(r) for r in resolutions)


def training_data_id(data_cfg: Any) -> dict:
    """The ``data`` settings that fix the training arrays (see ``TRAINING_DATA_KEYS``)."""
    keys = TRAINING_DATA_KEYS + (BURGERS_DATA_KEYS if data_cfg.dataset == "burgers" else ())
    return {key: getattr(data_cfg, key) for key in keys}


class ArrayBatchIterator(EpochBatchIterator):
    """Endless, seeded, resumable shuffled batches over in-memory arrays.

    Each epoch is a permutation of the samples drawn from ``(seed, epoch)``
    (see ``training.data.EpochBatchIterator``). ``data_id`` (plain JSON values
    naming the data, e.g. ``{"resolution": 32, ...}``) is saved with the
    position, and ``set_state`` refuses a state saved on other data.

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
        data_id: Mapping[str, Any] | None = None,
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if global_batch_size > len(x):
            raise ValueError(
                f"global_batch_size={global_batch_size} is larger than the "
                f"{len(x)} training samples"
            )
        self._x, self._y = x, y
        self.data_id = dict(data_id) if data_id is not None else None
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

    def get_state(self) -> dict:
        state = super().get_state()
        if self.data_id is not None:
            state["data"] = dict(self.data_id)
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues a saved position; ValueError if it was saved on other data.

        States without ``data`` (checkpoints from before it was recorded) are
        taken as they are.
        """
        saved = state.get("data")
        if self.data_id is not None and saved is not None:
            changed = [k for k, v in self.data_id.items() if saved.get(k) != v]
            if changed:
                then = ", ".join(f"data.{k}={saved.get(k)!r}" for k in changed)
                now = ", ".join(f"data.{k}={self.data_id[k]!r}" for k in changed)
                raise ValueError(
                    f"it was trained with {then}, this run has {now}; a resumed run "
                    "must train on the same data: use a new output_dir or the same settings"
                )
        super().set_state(state)


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


def _conjugate_complex_grads(grads):
    """The library's conjugation (`gj.conjugate_complex_grads`) applied to a gradient tree."""
    return gj.conjugate_complex_grads().update(grads, optax.EmptyState())[0]


def build_fno_task(config: Config) -> Task:
    """Generates the PDE data (and any super-resolution test sets); describes the task.

    Raises:
        ConfigError: model modes that do not fit the grid, bad data sizes, bad
            ``data.eval_resolutions``.
    """
    model_config = fno_config(config)
    resolutions = check_eval_resolutions(config.data.eval_resolutions, config.data, config.model)
    data = load_pde_data(config.data)
    micro_batch = config.batch_size // config.grad_accum_steps
    try:
        train_iterator = ArrayBatchIterator(
            data.x_train,
            data.y_train,
            global_batch_size=config.batch_size,
            seed=config.seed,
            data_id=training_data_id(config.data),
        )
        test_batches = eval_batches(data.x_test, data.y_test, micro_batch)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    start = time.perf_counter()
    extra_sets = {}
    for res in resolutions:
        if res == config.data.resolution:
            batches = test_batches
        else:
            batches = eval_batches(*load_test_set(config.data, res, data.x_normalizer), micro_batch)
        extra_sets[f"val_l2_res{res}"] = batches
    extra_seconds = time.perf_counter() - start
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

    def grid(res):
        return "x".join([str(res)] * model_config.dim)

    super_res = (
        f" | test also at {', '.join(grid(r) for r in resolutions)} "
        f"(generated in {extra_seconds:.1f} s)"
        if resolutions
        else ""
    )
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
            f"data: {config.data.dataset} {grid(config.data.resolution)} | "
            f"{len(data.x_train)} train / {len(data.x_test)} test samples | seed "
            f"{config.data.seed} | generated in {data.seconds:.1f} s{super_res}"
        ),
        postprocess_grads=_conjugate_complex_grads,
        optimizer_defaults=optimizer_defaults,
        extra_eval_sets=lambda: extra_sets,
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

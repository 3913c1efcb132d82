"""What train.py needs to know about a task, in one small object.

``train.py`` is task-agnostic: it asks the task for a model, a loss, a training
iterator and validation batches, and runs the same loop for all of them. A
task is added as a package ``tasks/<name>/``: a ``build_<name>_task(config) ->
Task`` function and a config class (a ``training.config.Config`` subclass with
its model/data sections and a ``build_task()`` calling that function), listed
in ``tasks.registry.TASKS``, the one task registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import jax
from flax import nnx

Batch = Mapping[str, Any]  # host (numpy) arrays with a leading batch dim


def _identity(x: Any) -> Any:
    return x


class BatchIterator(Protocol):
    """An endless, deterministic iterator whose position can be saved."""

    def __next__(self) -> Batch: ...

    def get_state(self) -> dict: ...  # JSON-serialisable

    def set_state(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass
class Task:
    """A training problem: model, loss, data and validation metrics.

    Attributes:
        name: task name (as in the config's ``task`` key).
        make_model: ``rngs -> nnx.Module``; also called under ``nnx.eval_shape``
            to get shapes without allocating.
        partition_specs: ``(abstract param state, rules) -> PartitionSpec tree``
            from the params' logical axis names.
        default_rules: logical-axis -> mesh-axis rules used when the config has
            none.
        layer_axes: ``abstract param state -> tree of int | None``: the
            stacked-layer axis of each param (GaLore treats it as a batch axis).
        loss_fn: ``(model, batch) -> scalar`` mean training loss.
        eval_loss_fn: ``(model, batch) -> scalar`` validation loss per batch.
        summarize_eval: mean validation loss -> metrics for the log, e.g.
            ``{"val_loss": ..., "val_ppl": ...}``.
        train_iterator: endless training batches (``[batch_size, ...]``).
        eval_batches: ``() -> iterable`` of a fixed set of validation batches.
        units_per_batch: what "throughput" counts per batch (tokens for LM).
        units_name: name of that unit in logs (``tokens``).
        description: one line printed at start-up (data size, vocab, ...).
        postprocess_grads: ``grads -> grads`` applied to the mean gradient
            before the optimizer (FNO: conjugate the complex leaves so optax
            descends). Default: identity.
        scanned_model: ``abstract model -> galore_jax.ScannedModel`` for tasks
            whose model is embedding -> scanned layers -> head (layer-wise
            updates, per-layer clipping); None for others.
        optimizer_defaults: ``OptimizerConfig -> OptimizerConfig``: fills in
            task-specific optimizer settings the user left unset (FNO: matrix
            GaLore only on the spectral weights). Applied before the config is
            saved, so ``config.yaml`` shows what ran. Default: identity.
        extra_eval_sets: ``() -> {metric name: iterable of batches}``: further
            validation sets, each evaluated like ``eval_batches`` (the mean of
            ``eval_loss_fn`` over its batches) and logged under its name next
            to ``summarize_eval``'s metrics (FNO: ``val_l2_res64``). Default: none.
    """

    name: str
    make_model: Callable[[nnx.Rngs], nnx.Module]
    partition_specs: Callable[[Any, Any], Any]
    default_rules: Any
    layer_axes: Callable[[Any], Any]
    loss_fn: Callable[[nnx.Module, Batch], jax.Array]
    eval_loss_fn: Callable[[nnx.Module, Batch], jax.Array]
    summarize_eval: Callable[[float], dict]
    train_iterator: BatchIterator
    eval_batches: Callable[[], Iterable[Batch]]
    units_per_batch: int
    units_name: str = "tokens"
    description: str = ""
    postprocess_grads: Callable[[Any], Any] = _identity
    optimizer_defaults: Callable[[Any], Any] = _identity
    scanned_model: Optional[Callable[[nnx.Module], Any]] = None
    extra_eval_sets: Callable[[], Mapping[str, Iterable[Batch]]] = dict

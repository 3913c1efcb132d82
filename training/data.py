"""Seeded, resumable batch iterators any task can build on (NumPy only).

* :func:`process_slice`: this process's rows of a global batch.
* :class:`EpochBatchIterator`: endless batches, one shuffled order of items per
  epoch drawn from ``(seed, epoch)``; its position is three plain ints saved
  with every checkpoint. A task subclasses it with its items and its batch
  (``tasks.lm.data.TokenBatchIterator``: token windows;
  ``tasks.fno.task.ArrayBatchIterator``: samples of in-memory arrays).

No JAX arrays here (JAX is only asked for the process index/count when those
are not given).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["EpochBatchIterator", "process_slice"]


def process_slice(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """(first row, rows) of this process's share of a global batch."""
    if process_index is None or process_count is None:
        import jax  # Lazily: only needed when the caller does not say.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"process_count ({process_count})"
        )
    rows = global_batch_size // process_count
    return process_index * rows, rows


class EpochBatchIterator:
    """Endless, seeded, resumable batches: one shuffled order of items per epoch.

    Subclasses give ``_order_for_epoch(epoch)`` (the items of an epoch, from
    ``(seed, epoch)`` only) and ``_batch(items)``. A batch that would run past
    the end of an epoch starts the next one (the tail is skipped). Each process
    yields its rows of every global batch. The position (``get_state``) is three
    ints, saved with every checkpoint.
    """

    def __init__(
        self,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int | None,
        process_count: int | None,
    ):
        self.global_batch_size = global_batch_size
        self._first_row, self.local_batch_size = process_slice(
            global_batch_size, process_index, process_count
        )
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self._order = self._order_for_epoch(0)

    def _order_for_epoch(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _batch(self, items: np.ndarray) -> dict:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.position + self.global_batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._order_for_epoch(self.epoch)
        first = self.position + self._first_row
        items = self._order[first : first + self.local_batch_size]
        self.position += self.global_batch_size
        return self._batch(items)

    def get_state(self) -> dict[str, int]:
        """Position in the stream as plain ints: ``{"seed", "epoch", "position"}``."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues exactly where the iterator that produced ``state`` was."""
        missing = {"seed", "epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"data iterator state lacks {sorted(missing)}: {dict(state)}")
        previous_seed = self.seed
        self.seed, epoch, position = (int(state[k]) for k in ("seed", "epoch", "position"))
        order = self._order_for_epoch(epoch) if epoch >= 0 else np.zeros(0)  # uses self.seed
        if epoch < 0 or not 0 <= position <= len(order):
            self.seed = previous_seed
            raise ValueError(
                f"data iterator state {dict(state)} does not fit this data (epoch {epoch} has "
                f"{len(order)} items): different data?"
            )
        self.epoch, self.position, self._order = epoch, position, order

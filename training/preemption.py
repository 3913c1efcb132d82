"""Stopping a run cleanly: signals agreed across processes, a second signal, a watchdog.

* A SIGTERM / SIGINT asks the run to stop. On a multi-host job hosts get it at
  different steps, and a host that saves while the others step on deadlocks the
  collective save, so every process votes each step (a tiny all-reduce of "was I
  signalled?") and all read the same vote one step later: they stop after the
  same step and save together. The one-step lag keeps the host one step ahead
  of the devices, as without the vote.
* A second SIGTERM / SIGINT aborts at once (exit 128 + signal number), even while
  the main thread is blocked inside a device step: a helper thread is woken by
  the signal itself (``signal.set_wakeup_fd``), not by the Python handler.
* A step that does not finish within ``step_timeout_s`` (the loop makes no
  progress: the device step, its log read, an eval or a save hangs) ends the
  process with one ``error:`` line (exit 3) instead of hanging forever. The first
  step (compilation) is not timed.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_SIGNUMS = tuple(int(s) for s in SIGNALS)
WATCHDOG_EXIT = 3


class Preemption:
    """Signal handling and the step watchdog of one training loop (a context manager).

    Args:
      mesh: the run's mesh (the vote is all-reduced over its devices).
      step_timeout_s: seconds a step may take before the process is ended
        (0: no watchdog).

    Usage::

        with Preemption(mesh, step_timeout_s=1800) as preemption:
            while True:
                step(...)
                if preemption.agreed_stop(step):  # the same answer on every process
                    break
    """

    def __init__(self, mesh: jax.sharding.Mesh, step_timeout_s: float = 0.0):
        self.step_timeout_s = float(step_timeout_s)
        self.signal_name: Optional[str] = None  # the first signal this process got
        self._signals_seen = 0
        self._previous = {}
        self._wakeup = None
        self._last_progress: Optional[float] = None
        self._step = 0
        self._done = threading.Event()
        self._thread = None
        self._pending_vote = None
        self._vote = _make_vote(mesh)

    # -- context ----------------------------------------------------------

    def __enter__(self) -> Preemption:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = (reader, writer)
        self._thread = threading.Thread(target=self._watch, name="preemption", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        reader, writer = self._wakeup
        writer.close()
        self._thread.join(timeout=5)
        reader.close()

    # -- the loop's side --------------------------------------------------

    def progress(self, step: int) -> None:
        """The loop finished ``step`` (restarts the watchdog's clock)."""
        self._step = step
        self._last_progress = time.monotonic()

    def agreed_stop(self, step: int) -> bool:
        """Whether every process stops after ``step``: any was signalled one step ago.

        Votes this step (asynchronously) and reads the previous step's vote, so all
        processes answer the same at the same step.
        """
        vote, self._pending_vote = self._pending_vote, self._vote(self.signal_name is not None)
        self.progress(step)
        if vote is None:
            return False
        stop = bool(vote)
        if stop and self.signal_name is None:
            self.signal_name = "SIGTERM (another process)"
        return stop

    # -- signals and the watchdog -----------------------------------------

    def _handle(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def _watch(self):
        reader, _ = self._wakeup
        reader.settimeout(1.0)
        while not self._done.is_set():
            try:
                data = reader.recv(16)
            except socket.timeout:
                data = b""
            except OSError:
                return
            for signum in data:
                if signum not in STOP_SIGNUMS:  # other handled signals wake us too
                    continue
                self._signals_seen += 1
                if self._signals_seen >= 2:
                    name = signal.Signals(signum).name
                    print(
                        f"second {name}: aborting now, without a checkpoint "
                        f"(the last saved one is kept)",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(128 + signum)
            last = self._last_progress
            if self.step_timeout_s > 0 and last is not None:
                waited = time.monotonic() - last
                if waited > self.step_timeout_s:
                    print(
                        f"error: step {self._step + 1} made no progress for {waited:.0f} s "
                        f"(step_timeout_s={self.step_timeout_s:g}); aborting so the job does "
                        "not hang (the last saved checkpoint is kept)",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(WATCHDOG_EXIT)


def _make_vote(mesh: jax.sharding.Mesh):
    """``flag -> global bool array``: any process's flag, all-reduced over the mesh."""
    votes = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # one entry per device
    any_vote = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))

    def vote(flag: bool):
        local = np.full((len(mesh.local_devices),), bool(flag))
        return any_vote(jax.make_array_from_process_local_data(votes, local, (mesh.size,)))

    return vote

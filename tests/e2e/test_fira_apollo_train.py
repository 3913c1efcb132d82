"""train.py with Fira and APOLLO: a run killed with SIGKILL resumes bit-exactly."""

import subprocess

import numpy as np
import pytest
from train_runs import (
    TIMEOUT,
    checkpoint_arrays,
    losses,
    run_train,
    start_train,
    wait_for_step,
)

STEPS = 12
OPTIMIZERS = {
    # A refresh every 3 steps and the limiter on: both sides of the resume point.
    "fira": ["optimizer.name=fira", "optimizer.rank=8", "optimizer.update_proj_gap=3"],
    "apollo": ["optimizer.name=apollo", "optimizer.rank=8", "optimizer.update_proj_gap=3"],
}


@pytest.mark.parametrize(
    "name",  # APOLLO's state round trip is in tests/galore_jax; its kill -9 run on demand
    # Both on demand: the default suite resumes Fira / APOLLO through orbax bit-exactly
    # (tests/galore_jax/test_fira_apollo.py) and train.py's kill -9 path with GaLore.
    [pytest.param(n, marks=pytest.mark.slow) for n in sorted(OPTIMIZERS)],
)
def test_resume_after_kill_is_bit_exact(name, tmp_path):
    from training.checkpoint import Checkpointer

    args = (
        f"steps={STEPS}",
        "optimizer.lr=0.01",
        "checkpoint.every=2",
        "checkpoint.max_to_keep=2",
        *OPTIMIZERS[name],
    )
    reference = tmp_path / "reference"
    run_train(reference, *args, "checkpoint.every=0")  # saves only the last step
    loss = losses(reference)
    assert loss[STEPS] < loss[1], loss

    killed = tmp_path / "killed"
    proc = start_train(killed, *args, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(proc, 8)
        proc.kill()  # SIGKILL: no handler runs
    finally:
        proc.wait(timeout=TIMEOUT)
    complete = Checkpointer(str(killed / "checkpoints")).latest_step()
    assert complete is not None and 4 <= complete < STEPS, complete  # past two refreshes
    resumed = run_train(killed, *args)
    assert f"resumed from step {complete}" in resumed.stdout, resumed.stdout
    assert losses(killed) == loss  # bitwise on CPU
    for item in ("params", "opt_state"):
        for a, b in zip(
            checkpoint_arrays(killed, STEPS, item), checkpoint_arrays(reference, STEPS, item)
        ):
            np.testing.assert_array_equal(a, b)

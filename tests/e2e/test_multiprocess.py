"""train.py on 2 processes x 4 CPU devices (jax.distributed on loopback).

The default suite runs the short version: GaLore with a refresh, 2 x 4 against
1 x 8 devices, and SIGTERM to one process stopping both after the same step.
The slow version adds resuming the 2-process checkpoint on 1 x 8 and 1 x 4.
"""

import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from train_runs import TIMEOUT, losses, run_train, start_train, subprocess_env

# Module fixtures are costly: all of this module on one xdist worker, so they run once.
pytestmark = pytest.mark.xdist_group("multiprocess")

# A refresh every 2 steps: refreshes before and after every resume point. No clipping:
# the data-parallel replicas average gradients in GaLore's subspace (the default there).
GALORE = [
    "optimizer.name=galore",
    "optimizer.grad_clip=0",
    "optimizer.rank=8",
    "optimizer.update_proj_gap=2",
    "optimizer.lr=0.01",
]
MESH = ["mesh.data=2", "mesh.fsdp=4"]
# Collectives across processes (gloo) sum in another order than in one process.
LOSS_RTOL = 2e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(output_dir, *overrides, processes=2, devices=4):
    """Starts ``processes`` train.py processes of ``devices`` CPU devices each."""
    port = free_port()
    procs = []
    for i in range(processes):
        env = subprocess_env(devices, cache=False)
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(processes),
            JAX_PROCESS_ID=str(i),
        )
        procs.append(start_train(output_dir, *overrides, env=env))
    return procs


def finish(procs):
    outs = [p.communicate(timeout=TIMEOUT * 2) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"process failed ({p.returncode}):\n{out}\n{err[-3000:]}"
    return [out for out, _ in outs]


def checkpoints(output_dir):
    return sorted(
        int(p.name) for p in Path(output_dir, "checkpoints").iterdir() if p.name.isdigit()
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """6 GaLore steps on 1 process x 8 devices."""
    out = tmp_path_factory.mktemp("one_process")
    run_train(out, "steps=6", *GALORE, *MESH, devices=8)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same steps on 2 processes x 4 devices, stopped (with a checkpoint) at 3."""
    out = tmp_path_factory.mktemp("two_processes")
    stdout = finish(start_processes(out, "steps=6", "stop_after=3", *GALORE, *MESH))
    assert "stopped after step 3 (stop_after)" in stdout[0]
    assert "step" not in stdout[1]  # only process 0 logs
    return out


def test_two_processes_give_the_losses_of_one(one_process, two_processes):
    ref, got = losses(one_process), losses(two_processes)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=LOSS_RTOL)
    assert checkpoints(two_processes) == [3]


@pytest.mark.slow
@pytest.mark.parametrize(
    "devices, mesh", [(8, MESH), (4, ["mesh.data=1", "mesh.fsdp=4"])], ids=["1x8", "1x4"]
)
def test_two_process_checkpoint_resumes_on_one_process(
    one_process, two_processes, tmp_path, devices, mesh
):
    out = tmp_path / "out"
    shutil.copytree(two_processes, out)
    resumed = run_train(out, "steps=6", *GALORE, *mesh, devices=devices)
    assert "resumed from step 3" in resumed.stdout
    ref, got = losses(one_process), losses(out)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=LOSS_RTOL)


@pytest.mark.slow  # two processes; the default suite runs test_two_processes_give_the_losses_of_one
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    procs = start_processes(tmp_path, "steps=2000", *GALORE, *MESH)
    lines = []
    for line in procs[0].stdout:  # process 0 logs every step
        lines.append(line)
        match = re.match(r"step\s+(\d+) \| loss", line)
        if match and int(match.group(1)) >= 4:
            break
    else:
        pytest.fail("run ended early:\n" + "".join(lines) + procs[0].stderr.read()[-3000:])
    procs[1].send_signal(signal.SIGTERM)  # the other process: not the one that logs
    outs = [p.communicate(timeout=TIMEOUT * 2) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    stdout = "".join(lines) + outs[0][0]
    match = re.search(
        r"SIGTERM \(another process\): stopped at step (\d+); checkpoint saved", stdout
    )
    assert match, stdout[-3000:]
    stopped = int(match.group(1))
    assert checkpoints(tmp_path) == [stopped]  # one checkpoint, written by both together
    assert max(losses(tmp_path)) == stopped
    assert not [p for p in Path(tmp_path, "checkpoints").iterdir() if "tmp" in p.name]


def test_each_process_reads_only_its_rows_of_the_batch():
    from tasks.lm.data import TokenBatchIterator

    tokens = np.arange(10_000, dtype=np.int32) % 251
    whole = TokenBatchIterator(tokens, global_batch_size=8, seq_len=16, seed=3)
    parts = [
        TokenBatchIterator(
            tokens, global_batch_size=8, seq_len=16, seed=3, process_index=i, process_count=2
        )
        for i in range(2)
    ]
    for _ in range(3):
        full = next(whole)
        halves = [next(p) for p in parts]
        for key in ("inputs", "targets"):
            assert all(h[key].shape == (4, 16) for h in halves)
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])


def test_second_sigterm_aborts_at_once(tmp_path):
    # Steps of ~0.5 s (a larger model) keep the run stepping towards its agreed stop
    # (two steps on) while the second signal comes; two signals sent at once would
    # merge into one pending signal.
    proc = start_train(
        tmp_path,
        "steps=100000",
        "batch_size=64",
        "model.hidden_size=256",
        "model.intermediate_size=688",
        "model.num_layers=4",
    )
    for line in proc.stdout:
        if re.match(r"step\s+3 \| loss", line):
            break
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "second SIGTERM: aborting now" in err


def test_step_watchdog_ends_a_stuck_run_with_one_error(tmp_path):
    # A step far slower than the watchdog allows stands in for a hung one.
    proc = run_train(tmp_path, "steps=50", "batch_size=256", "step_timeout_s=0.05", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert re.search(
        r"error: step \d+ made no progress for \d+ s \(step_timeout_s=0.05\)", proc.stderr
    )
    assert os.path.isdir(tmp_path)

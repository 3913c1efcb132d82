"""Running train.py as a user does, for the end-to-end tests: a subprocess on the tiny
LLaMA config with its own device count, and readers of what a run leaves behind."""

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from xla_flags import cpu_test_xla_flags

from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_seq_len=64",
    "seq_len=32",
    "batch_size=8",
    "data.max_corpus_bytes=200000",
    "progress_bar=false",
    "eval_every=0",
    "eval_batches=1",
    "log_every=1",
    "checkpoint.every=0",
]
# GaLore with a refresh every 3 steps: the state holds projectors, counters and
# a PRNG key, and refreshes happen on both sides of every resume point.
GALORE = [
    "optimizer.name=galore",
    "optimizer.rank=8",
    "optimizer.update_proj_gap=3",
    "optimizer.lr=0.01",
]


def train_command(output_dir, *overrides):
    """``python train.py`` on the tiny config with ``overrides``."""
    return [
        sys.executable,
        "train.py",
        "--config",
        "configs/llama_tiny.yaml",
        *TINY,
        f"output_dir={output_dir}",
        *overrides,
    ]


def run_train(output_dir, *overrides, devices=1, check=True):
    """Runs ``train.py`` on the tiny config; returns the CompletedProcess."""
    proc = subprocess.run(
        train_command(output_dir, *overrides),
        cwd=REPO,
        env=subprocess_env(devices),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_train(output_dir, *overrides, env=None, stderr=subprocess.PIPE):
    """Starts ``train.py`` on the tiny config (one device unless ``env`` says); text pipes."""
    return subprocess.Popen(
        train_command(output_dir, *overrides),
        cwd=REPO,
        env=env or subprocess_env(1),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


# A persistent XLA cache shared by every train.py this test process starts:
# compiling the tiny model's step dominates a run (~10 s of ~14 s on 2 CPU cores),
# and most runs compile the same programs. One directory per process (xdist
# workers do not share one: concurrent writers could expose a half-written entry).
_COMPILATION_CACHE = {}


def compilation_cache_dir() -> str:
    if "dir" not in _COMPILATION_CACHE:
        _COMPILATION_CACHE["dir"] = tempfile.mkdtemp(prefix="galore_jax_tests_xla_cache_")
        atexit.register(shutil.rmtree, _COMPILATION_CACHE["dir"], ignore_errors=True)
    return _COMPILATION_CACHE["dir"]


def subprocess_env(devices, cache=True):
    """The environment of a train.py child: ``devices`` CPU devices, the shared XLA
    cache unless ``cache=False`` (processes of one jax.distributed job compile the
    same programs at once)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = cpu_test_xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache_dir()
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def losses(output_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(output_dir)) if "loss" in r}


def checkpoint_arrays(output_dir, step, item="params"):
    """The arrays of one checkpoint item, as a list of numpy arrays."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(Path(output_dir, "checkpoints", str(step), item))
    if isinstance(tree, dict):  # lists may come back as {"0": ..., "1": ...}
        tree = [tree[k] for k in sorted(tree, key=int)]
    return [np.asarray(x) for x in tree]


def tmp_checkpoint_dirs(output_dir):
    return [p.name for p in Path(output_dir, "checkpoints").glob("*orbax-checkpoint-tmp*")]


def wait_for_step(proc, step):
    """Reads the child's stdout until it logs ``step``; returns the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = re.match(r"step\s+(\d+) \| loss", line)
        if match and int(match.group(1)) >= step:
            return lines
    raise AssertionError("run ended before step %d:\n%s" % (step, "".join(lines)))

"""Nothing a user trained is lost: runs written by galore-jax 0.2.0 resume with
today's code, with the command they were started with, and continue as 0.2.0 did."""

import json
import shutil
from pathlib import Path

import pytest

import train
from training.metrics import read_metrics

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "checkpoint_v0_2_0"
# The command the fixtures were written with (data/checkpoint_v0_2_0/README.md).
COMMAND = (
    "--config configs/llama_tiny.yaml model.hidden_size=32 model.intermediate_size=64 "
    "model.num_layers=2 model.num_heads=2 model.max_seq_len=64 seq_len=32 batch_size=8 "
    "data.max_corpus_bytes=200000 progress_bar=false eval_every=0 eval_batches=1 "
    "log_every=1 optimizer.name=galore optimizer.rank=8 optimizer.update_proj_gap=3 "
    "optimizer.lr=0.01 steps=8 checkpoint.every=4"
).split()
LOW_BIT = ["optimizer.moment_bits=8", "optimizer.projector_bits=8"]


@pytest.mark.parametrize(
    "run, extra",
    [("galore32", []), pytest.param("galore8", LOW_BIT, marks=pytest.mark.slow)],
)
def test_run_written_by_0_2_0_resumes_and_continues_alike(run, extra, tmp_path, capsys):
    out = tmp_path / run
    shutil.copytree(FIXTURES / run, out)
    expected = json.loads((out / "continuation.json").read_text())["continuation_losses"]
    code = train.main([*COMMAND, *extra, f"output_dir={out}"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "resumed from step 4" in stdout
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    for step, loss in expected.items():
        assert losses[int(step)] == pytest.approx(loss, rel=1e-3), (step, losses)

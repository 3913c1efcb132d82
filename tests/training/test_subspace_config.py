"""optimizer.full_size_gradients: which runs sum gradients in GaLore's subspace."""

import pytest

from tasks.registry import load_config
from training import steps
from training.config import ConfigError

GALORE = ["optimizer.name=galore", "grad_accum_steps=2", "model.num_layers=1"]


def _run(overrides, devices=1):
    return steps.build_run(load_config("configs/llama_tiny.yaml", overrides), devices)


def test_the_subspace_path_is_the_default_where_exact():
    assert _run([*GALORE, "optimizer.grad_clip=0"]).subspace_gradients
    clipped = _run(GALORE)  # the config clips: the full-size sum, and a note says why
    assert not clipped.subspace_gradients
    assert any("grad_clip > 0 needs the full gradient's norm" in n for n in clipped.notes)
    assert not _run(
        [*GALORE, "optimizer.grad_clip=0", "optimizer.full_size_gradients=true"]
    ).subspace_gradients
    run = _run([*GALORE, "optimizer.full_size_gradients=false"])
    assert run.subspace_gradients
    assert any("bounds the norm of the gradient in GaLore's subspace" in n for n in run.notes)
    described = steps.describe_run(run)
    assert "gradients in GaLore's subspace: 2 micro-batch(es)" in described
    assert "in 2 part(s)" in described  # optimizer.refresh_parts' default
    # One micro-batch on one replica: nothing to sum.
    plain = ["optimizer.name=galore", "optimizer.full_size_gradients=false"]
    assert not _run([*plain, "model.num_layers=1"]).subspace_gradients


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["optimizer.name=adamw"], "optimizer.name=adamw"),
        (["optimizer.name=fira"], "optimizer.name=fira"),
        (["optimizer.svd=exact"], "optimizer.svd=exact"),
        (["optimizer.grad_clip_mode=layer"], "optimizer.grad_clip_mode=layer"),
        (["optimizer.refresh_parts=0"], "optimizer.refresh_parts"),
    ],
)
def test_runs_that_cannot_sum_in_the_subspace_say_why(overrides, named):
    with pytest.raises(ConfigError, match=named):
        _run([*GALORE, "optimizer.full_size_gradients=false", *overrides])

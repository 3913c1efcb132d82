"""Compiled peak memory of train.py's step: GaLore must keep its saving.

A compile-only guard (nothing allocated, XLA's memory analysis on one CPU
device) at a shape where a second copy of the gradient tree shows: every
projected matrix is 256 x 256 or bigger, so the layers' gradients dominate. It
once went unseen that a whole-model refresh kept a scaled copy of every
gradient alive across the shared factorisations: GaLore's temporaries grew from
AdamW's size to AdamW's plus one gradient tree.
"""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import memory  # noqa: E402

from tasks.registry import load_config  # noqa: E402

# Module fixtures are costly: all of this module on one xdist worker, so they run once.
pytestmark = pytest.mark.xdist_group("step_memory")

SHAPE = [
    "model.hidden_size=256",
    "model.intermediate_size=688",
    "model.num_layers=4",
    "model.vocab_size=512",
    "model.remat=true",
    "batch_size=2",
    "seq_len=64",
    "optimizer.rank=32",
]
LAYERWISE = ["optimizer.layerwise=true", "optimizer.grad_clip_mode=layer"]
VARIANTS = {
    "adamw": ["optimizer.name=adamw"],
    "galore": ["optimizer.name=galore"],
    "galore_layerwise": ["optimizer.name=galore", *LAYERWISE],
    # Two micro-batches: summed in GaLore's subspace (standard and layer-wise) or at
    # full size.
    "galore_accum2": [
        "optimizer.name=galore",
        "grad_accum_steps=2",
        "optimizer.full_size_gradients=false",
    ],
    "galore_accum2_full_size": [
        "optimizer.name=galore",
        "grad_accum_steps=2",
        "optimizer.full_size_gradients=true",
    ],
    "galore_layerwise_accum2": ["optimizer.name=galore", *LAYERWISE, "grad_accum_steps=2"],
}


@pytest.fixture(scope="module")
def step_memory():
    out = {}
    for name, overrides in VARIANTS.items():
        config = load_config(str(REPO_ROOT / "configs" / "llama_tiny.yaml"), SHAPE + overrides)
        out[name] = memory.compiled_step_memory(config, num_devices=1)
    return out


def test_galore_step_holds_no_second_gradient_tree(step_memory):
    adamw, galore = step_memory["adamw"], step_memory["galore"]
    grads = galore["gradient_bytes"]
    assert adamw["gradient_bytes"] == grads
    # AdamW's temporaries are the gradient tree plus activations and small scratch;
    # GaLore's add only low-rank pieces (sketches, projected gradients): far below
    # another gradient tree.
    assert galore["temp_bytes"] < adamw["temp_bytes"] + 0.25 * grads, (galore, adamw)
    # And the point of GaLore: its whole step is smaller than AdamW's.
    assert galore["peak_bytes"] < adamw["peak_bytes"] - 0.5 * (
        adamw["opt_state_bytes"] - galore["opt_state_bytes"]
    )


def test_layerwise_step_stays_within_its_budget(step_memory):
    lw, galore = step_memory["galore_layerwise"], step_memory["galore"]
    excess = lw["peak_bytes"] - lw["params_bytes"] - lw["opt_state_bytes"]
    # One layer's gradient at a time (gradient_bytes is the largest group) plus
    # activations; the budget leaves room for XLA's scratch but not for the whole
    # gradient tree that the standard step holds.
    assert lw["gradient_bytes"] < galore["gradient_bytes"] / 2
    budget = 2 * lw["gradient_bytes"] + lw["activation_bytes"] + 0.25 * galore["gradient_bytes"]
    assert excess < budget, (excess, budget, lw)
    assert lw["peak_bytes"] < galore["peak_bytes"]


def test_micro_batches_in_the_subspace_hold_no_full_size_sum(step_memory):
    # Summed at full size, the micro-batches cost a second gradient tree (the sum beside
    # a micro-batch's gradient); in the subspace only low-rank sums and the refresh's
    # operands, far below it. Layer-wise, where no whole gradient tree exists either.
    grads = step_memory["galore"]["gradient_bytes"]
    full, sub = step_memory["galore_accum2_full_size"], step_memory["galore_accum2"]
    assert full["peak_bytes"] > step_memory["galore"]["peak_bytes"] + 0.5 * grads
    assert sub["peak_bytes"] < step_memory["galore"]["peak_bytes"] + 0.25 * grads, sub
    lw, lw2 = step_memory["galore_layerwise"], step_memory["galore_layerwise_accum2"]
    assert lw2["peak_bytes"] < lw["peak_bytes"] + 0.25 * grads, (lw2, lw)


def test_refresh_in_parts_keeps_micro_batches_at_the_unaccumulated_peak(step_memory):
    # The refresh passes in 2 parts (the default) hold half the range finder's buffers:
    # at this shape 1.01x the step without accumulation, where 1 part gives 1.05x
    # (LLaMA-1B: 0.99x and 1.07x).
    galore, sub = step_memory["galore"], step_memory["galore_accum2"]
    assert sub["peak_bytes"] <= 1.03 * galore["peak_bytes"], (sub, galore)


def test_layerwise_micro_batches_peak_below_the_unaccumulated_step(step_memory):
    # Layer-wise, the head's and the embedding's gradients are formed after the layers'
    # updates (not summed beside the layers' low-rank sums) and the new projectors are
    # held once: at this shape 0.95x the layer-wise step without accumulation (its
    # micro-batches' smaller activations show); summing those two groups beside the
    # layers' and keeping both projector sets gave 1.00x. LLaMA-1B: 1.08x (see the slow
    # test below).
    lw, lw2 = step_memory["galore_layerwise"], step_memory["galore_layerwise_accum2"]
    assert lw2["peak_bytes"] <= 0.98 * lw["peak_bytes"], (lw2, lw)


LLAMA_1B = [
    "model.remat=true",
    "model.vocab_size=32000",
    "batch_size=8",
    "grad_accum_steps=1",
    "seq_len=256",
]


@pytest.mark.slow
def test_llama_1b_micro_batch_peaks_meet_their_targets():
    # The headline figures (benchmarks/memory.py at LLaMA-1B, f32 params, 4 micro-batches
    # of 2 x 256): the standard step <= 1.05x its peak without accumulation (0.99x),
    # layer-wise <= 1.10x (1.08x). Four compiles of about 20 s each.
    peaks = {}
    for name in ("galore", "galore_accum4", "galore_layerwise", "galore_layerwise_accum4"):
        overrides, _ = memory.VARIANTS[name]
        config = load_config(str(REPO_ROOT / "configs" / "llama_1b.yaml"), LLAMA_1B + overrides)
        peaks[name] = memory.compiled_step_memory(config, num_devices=1)["peak_bytes"]
    assert peaks["galore_accum4"] <= 1.05 * peaks["galore"], peaks
    assert peaks["galore_layerwise_accum4"] <= 1.10 * peaks["galore_layerwise"], peaks

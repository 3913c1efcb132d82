"""Layer-wise updates (``galore_jax.layerwise``, ``optimizer.layerwise=true``).

The claim under test: a layer-wise step, which never holds the whole gradient
tree, trains exactly like the standard step with the same optimizer and the
same clipping rule. Checked through train.py on one device (the user's path,
with kill -9 and resume), in-process on 8-device meshes of both kinds, and on
a user's own scanned model written as three functions.
"""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scanned_user_model import scanned_user_model
from train_runs import (
    REPO,
    TIMEOUT,
    TINY,
    checkpoint_arrays,
    losses,
    run_train,
    start_train,
    wait_for_step,
)

import galore_jax as gj
import train
from tasks.registry import load_config
from training import mesh as mesh_lib
from training import steps

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import update_cost  # noqa: E402

# Module fixtures are costly: all of this module on one xdist worker, so they run once.
pytestmark = pytest.mark.xdist_group("layerwise")

STEPS = 20
# Refreshes at steps 0, 8 and 16: two on the schedule after the first.
GALORE = [
    "optimizer.name=galore",
    "optimizer.rank=8",
    "optimizer.update_proj_gap=8",
    "optimizer.lr=0.01",
]
# Sums over a layer's slice vs over the stack differ in the last bits, and
# GaLore's refreshes see them: measured max ~3e-6 relative on params.
RTOL = 2e-5


def assert_trees_close(a, b, rtol=RTOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(y)), 1e-30)
        assert np.max(np.abs(x - y)) / scale < rtol, np.max(np.abs(x - y)) / scale


# ----------------------------------------------------------------------------
# train.py, one device: the user's path.
# ----------------------------------------------------------------------------


# Two micro-batches a step: the layer-wise step sums them in GaLore's subspace, the
# standard one (full_size_gradients=true) at full size. No clip: a clip reads the
# gradient each path holds (the one-micro-batch layer-wise step against the standard
# one, clips included: the in-process tests below and test_user_scanned_model_*).
ACCUM = ["grad_accum_steps=2", "optimizer.grad_clip=0"]
LAYERWISE = ["optimizer.layerwise=true", *ACCUM, "checkpoint.every=5", *GALORE]


@pytest.fixture(scope="module")
def standard_full_size(tmp_path_factory):
    out = tmp_path_factory.mktemp("standard")
    run_train(out, f"steps={STEPS}", *ACCUM, "optimizer.full_size_gradients=true", *GALORE)
    return out


@pytest.fixture(scope="module")
def layerwise_micro_batches(tmp_path_factory):
    out = tmp_path_factory.mktemp("layerwise")
    proc = run_train(out, f"steps={STEPS}", *LAYERWISE)
    assert "layer-wise updates" in proc.stdout
    assert "gradients in GaLore's subspace: 2 micro-batch(es) summed as" in proc.stdout
    return out


def test_layerwise_train_py_matches_the_full_size_standard_step(
    standard_full_size, layerwise_micro_batches
):
    ref, got = losses(standard_full_size), losses(layerwise_micro_batches)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=RTOL)
    assert_trees_close(
        checkpoint_arrays(layerwise_micro_batches, STEPS),
        checkpoint_arrays(standard_full_size, STEPS),
    )


def test_layerwise_resume_after_kill_is_bit_exact(layerwise_micro_batches, tmp_path):
    args = (f"steps={STEPS}", *LAYERWISE)
    proc = start_train(tmp_path, *args, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(proc, 12)  # checkpoint 10 is complete: saves finish before step 12 logs
        proc.kill()  # SIGKILL: no handler runs
    finally:
        proc.wait(timeout=TIMEOUT)
    resumed = run_train(tmp_path, *args)
    assert re.search(r"resumed from step (5|10)\b", resumed.stdout), resumed.stdout
    assert losses(tmp_path) == losses(layerwise_micro_batches)  # bitwise on CPU
    for item in ("params", "opt_state"):
        for a, b in zip(
            checkpoint_arrays(tmp_path, STEPS, item),
            checkpoint_arrays(layerwise_micro_batches, STEPS, item),
        ):
            np.testing.assert_array_equal(a, b)


def test_switching_layerwise_on_resume_is_one_clear_error(layerwise_micro_batches, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(layerwise_micro_batches, out)
    proc = run_train(out, f"steps={STEPS + 2}", *ACCUM, *GALORE, check=False)
    assert proc.returncode == 2
    assert re.search(r"error: .*optimizer.layerwise", proc.stderr), proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optimizer.layerwise=true", "grad_accum_steps=2", "optimizer.name=adamw"],
            r"optimizer.layerwise=true with grad_accum_steps=2 sums the micro-batches in "
            r"GaLore's subspace, which cannot be done with optimizer.name=adamw \(only galore "
            r"projects every matrix's gradient\); change that, or set grad_accum_steps=1",
        ),
        (
            [
                "optimizer.layerwise=true",
                "grad_accum_steps=2",
                "optimizer.grad_clip_mode=layer",
                "optimizer.name=galore",
                "optimizer.full_size_gradients=true",
            ],
            r"which cannot be done with optimizer.full_size_gradients=true",
        ),
        (
            ["optimizer.layerwise=true"],  # grad_clip 1.0 by the global norm (the default)
            r"cannot clip by this step's global norm .*grad_clip_mode=layer or previous_global",
        ),
        (
            ["optimizer.layerwise=true", "optimizer.grad_clip=0", "model.scan_layers=false"],
            r"optimizer.layerwise=true needs stacked layers: set model.scan_layers=true",
        ),
        (
            ["model.scan_layers=false", "optimizer.grad_clip_mode=layer"],
            r"optimizer: layer-wise updates need LlamaConfig.scan_layers=True",
        ),
        (
            ["optimizer.layerwise=maybe"],
            r"optimizer.layerwise",
        ),
    ],
)
def test_bad_layerwise_combinations_are_one_clear_error(tmp_path, capsys, overrides, message):
    code = train.main(
        ["--config", "configs/llama_tiny.yaml", *TINY, f"output_dir={tmp_path / 'o'}", *overrides]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch(r"error: .+\n", err), err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_layerwise_refuses_the_fno_task(tmp_path, capsys):
    code = train.main(
        [
            "--config",
            "configs/fno_darcy.yaml",
            f"output_dir={tmp_path / 'o'}",
            "optimizer.layerwise=true",
        ]
    )
    assert code == 2
    assert "optimizer.layerwise=true needs a model of scanned layers" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# In-process on 8 virtual devices: both mesh kinds, every optimizer.
# ----------------------------------------------------------------------------


def train_losses(overrides, steps_to_run=STEPS):
    """Losses and final params of ``steps_to_run`` steps through training.steps."""
    config = load_config(
        str(REPO / "configs/llama_tiny.yaml"),
        [*TINY, f"steps={STEPS}", "mesh.data=2", "mesh.fsdp=4", *overrides],
    )
    run = steps.build_run(config, jax.device_count())
    with mesh_lib.use_mesh(run.mesh):
        params, opt_state, _ = steps.init_or_restore(run, None)
        step = steps.make_train_step(run)
        out = []
        for _ in range(steps_to_run):
            params, opt_state, metrics = step(params, opt_state, steps.next_train_batches(run))
            out.append(float(metrics["loss"]))
        return out, jax.device_get(params), run


@pytest.mark.parametrize(
    "kind, optimizer",
    [
        # On demand (-m slow): train.py's one-micro-batch layer-wise step against the
        # standard one (the default suite has it on a user's model and on every optimizer).
        pytest.param("auto", ["optimizer.name=adamw", "optimizer.lr=0.01"], marks=pytest.mark.slow),
        pytest.param(
            "explicit",
            [*GALORE, "optimizer.stagger=true", "optimizer.svd.warm_start=true"],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "auto",
            [*GALORE, "optimizer.grad_clip_mode=previous_global", "optimizer.grad_clip=0.5"],
            marks=pytest.mark.slow,
        ),
        # Four micro-batches summed in the subspace against the full-size sum (the
        # default suite has train.py's on one device, and the library's in float64).
        pytest.param(
            "auto", [*GALORE, "grad_accum_steps=4", "batch_size=32"], marks=pytest.mark.slow
        ),
        pytest.param(
            "explicit", [*GALORE, "grad_accum_steps=4", "batch_size=32"], marks=pytest.mark.slow
        ),
    ],
    ids=[
        "adamw-auto",
        "galore-stagger-warm-explicit",
        "galore-previous-norm-clip-auto",
        "galore-micro-batches-auto",
        "galore-micro-batches-explicit",
    ],
)
def test_layerwise_matches_the_standard_step_on_eight_devices(kind, optimizer):
    clip = [] if any("grad_clip" in o for o in optimizer) else ["optimizer.grad_clip=0"]
    common = [f"mesh.kind={kind}", *clip, *optimizer]
    # 10 steps: the staggered refreshes of the first gap and each leaf's next one.
    ref, ref_params, _ = train_losses(
        [*common, "optimizer.full_size_gradients=true"], steps_to_run=10
    )
    got, got_params, run = train_losses([*common, "optimizer.layerwise=true"], steps_to_run=10)
    assert isinstance(run.abstract_opt_state, gj.layerwise.LayerwiseState)
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    assert ref[-1] < ref[0]
    assert_trees_close(got_params, ref_params)


def test_layerwise_state_is_sharded_like_the_params():
    config = load_config(
        str(REPO / "configs/llama_tiny.yaml"),
        [
            *TINY,
            "mesh.data=2",
            "mesh.fsdp=4",
            "optimizer.layerwise=true",
            "optimizer.grad_clip=0",
            *GALORE,
        ],
    )
    run = steps.build_run(config, jax.device_count())
    layers = run.opt_shardings.layers
    # Every per-layer state leaf is stacked on an unsharded leading axis, and the
    # token embedding's moments (vocab x embed) are split like the embedding.
    specs = {
        gj.paths.path_string(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(layers)[0]
    }
    assert all(spec[0] is None for spec in specs.values())  # the layer axis
    embedding = [
        s.spec
        for p, s in jax.tree_util.tree_flatten_with_path(run.opt_shardings.before)[0]
        if "token_embedding" in gj.paths.path_string(p) and len(s.spec) == 2
    ]
    table = run.param_shardings["token_embedding"].spec
    assert "fsdp" in tuple(table)
    assert embedding and all(spec == table for spec in embedding)


@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param(
            ["optimizer.name=tensor_galore", "optimizer.rank=0.5", "optimizer.update_proj_gap=4"],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            [*GALORE, "optimizer.adam.bits=8", "optimizer.projector.bits=4"],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["tensor_galore", "galore-8bit-int4"],
)
def test_layerwise_trains_every_optimizer(optimizer):
    got, _, run = train_losses(
        [
            "optimizer.layerwise=true",
            "optimizer.grad_clip_mode=layer",
            "optimizer.lr=0.01",
            *optimizer,
        ],
        steps_to_run=10,
    )
    assert np.all(np.isfinite(got)) and got[-1] < got[0], got


# ----------------------------------------------------------------------------
# The library on a user's own model (plain dict params, own names).
# ----------------------------------------------------------------------------


def _user_model():
    return scanned_user_model()


def _user_batches(n):
    rng = np.random.default_rng(1)
    return [
        {
            "x": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "clip", [None, "layer", pytest.param("previous_global", marks=pytest.mark.slow)]
)
def test_user_scanned_model_matches_a_plain_optax_loop(clip):
    model, params, loss = _user_model()
    dims = {
        "encoder": None,
        "trunk": {
            "dense": {"kernel": gj.DimensionNumbers((0,)), "bias": gj.DimensionNumbers((0,))}
        },
        "readout": None,
    }
    # No stagger: it spreads refreshes over the projected leaves of each group
    # (here the encoder and the trunk), the standard step over the whole tree.
    options = dict(rank=4, update_proj_gap=3, weight_decay=0.1)
    standard = gj.galore_adamw(3e-3, dimension_numbers=dims, **options)
    if clip == "layer":
        standard = optax.chain(gj.clipping.clip_by_layer_norm(0.05, model), standard)
    elif clip == "previous_global":
        standard = optax.chain(gj.clipping.clip_by_previous_global_norm(0.05), standard)
    # One group at a time, the optimizer cannot tell the encoder (a table by
    # structure: its input side is no layer size) from a layer: labels by path.
    labels = gj.labels.labels_by_path(gj.galore_labels(params, dimension_numbers=dims, rank=4))
    tx = gj.galore_adamw(3e-3, labels=labels, **options)
    step = jax.jit(
        gj.layerwise_step(tx, model, max_norm=None if clip is None else 0.05, clip=clip or "layer")
    )

    @jax.jit
    def standard_step(p, s, b):
        value, g = jax.value_and_grad(loss)(p, b)
        u, s = standard.update(g, s, p)
        return optax.apply_updates(p, u), s, value, optax.tree.norm(g)

    p1, s1 = params, standard.init(params)
    p2, s2 = params, gj.layerwise_init(tx, model, params)
    for b in _user_batches(10):
        p1, s1, l1, n1 = standard_step(p1, s1, b)
        p2, s2, m = step(p2, s2, b)
        np.testing.assert_allclose(m["loss"], l1, rtol=RTOL)
        np.testing.assert_allclose(m["grad_norm"], n1, rtol=RTOL)
    assert_trees_close(p2, p1)
    if clip is not None:  # the clip bit: 0.05 is below every gradient norm here
        assert float(n1) > 0.05


def test_scanned_model_names_what_is_wrong():
    model, params, _ = _user_model()
    tx = optax.adam(1e-3)
    with pytest.raises(ValueError, match=r"unassigned \['extra'\]"):
        gj.layerwise_init(tx, model, {**params, "extra": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"max_norm must be a number > 0"):
        gj.layerwise_step(tx, model, max_norm=-1.0)
    with pytest.raises(ValueError, match=r"clip must be one of"):
        gj.layerwise_step(tx, model, max_norm=1.0, clip="global")


def _hidden(tx):
    """`tx` as a plain ExtraArgs transformation: layerwise_step cannot tell it takes
    `grad_scale`, so it scales the gradients in full size first."""
    return optax.GradientTransformationExtraArgs(tx.init, tx.update)


@pytest.mark.parametrize("clip", ["layer", pytest.param("previous_global", marks=pytest.mark.slow)])
def test_clip_factor_reaches_our_optimizer_as_grad_scale(clip):
    """galore_adamw takes the layer-wise clip factor as `grad_scale` (applied to the
    low-rank gradients): same training as scaling the gradients first, and fewer ops
    of the compiled step touch a full-size layer gradient."""
    model, params, _ = _user_model()
    labels = gj.labels.labels_by_path(gj.galore_labels(params, rank=4))
    tx = gj.galore_adamw(3e-3, labels=labels, rank=4, update_proj_gap=3, weight_decay=0.1)
    assert isinstance(tx, gj.GradScaleTransformation)
    fused, scaled_first = (
        jax.jit(gj.layerwise_step(t, model, max_norm=0.05, clip=clip)) for t in (tx, _hidden(tx))
    )
    p1 = p2 = params
    s1 = s2 = gj.layerwise_init(tx, model, params)
    for b in _user_batches(8):
        p1, s1, _ = fused(p1, s1, b)
        p2, s2, m = scaled_first(p2, s2, b)
        assert float(m["grad_norm"]) > 0.05  # every step clips
    assert_trees_close(p1, p2)

    batch = _user_batches(1)[0]
    one_layer = 24 * 24  # the trunk kernel's slice, the one projected layer leaf

    def passes(step):  # between refreshes (a refresh reads the raw gradient either way)
        hlo = step.lower(params, s1, batch).compile().as_text()
        return update_cost.full_size_passes(hlo, [one_layer], branches=False)

    # The full-size multiply kernel (read + write of the layer's gradient) is gone.
    assert passes(fused) == passes(scaled_first) - 1, (passes(fused), passes(scaled_first))


# ----------------------------------------------------------------------------
# What a layer-wise step cannot do is one clear error, not a silent other rule.
# ----------------------------------------------------------------------------


def test_non_scalar_loss_is_one_clear_error():
    """A per-element loss used to be summed silently (and returned unreduced)."""
    model, params, _ = _user_model()

    def per_element_head(p, x, batch):
        return (x @ p["readout"] - batch["y"]) ** 2  # (16, 3): no .mean()

    model = model._replace(head=per_element_head)
    tx = optax.adam(1e-3)
    step = gj.layerwise_step(tx, model)
    state = gj.layerwise_init(tx, model, params)
    with pytest.raises(ValueError, match=r"scalar loss, got shape \(16, 3\).*\.mean\(\)"):
        jax.eval_shape(step, params, state, _user_batches(1)[0])


def _clipped_optimizers():
    adam = optax.adam(1e-3)
    return {
        "galore_adamw": gj.galore_adamw(1e-3, rank=4, max_grad_norm=1.0),
        "tensor_galore_adamw": gj.tensor_galore_adamw(1e-3, max_grad_norm=1.0),
        "chain": optax.chain(optax.clip_by_global_norm(1.0), adam),
        "master_weights": gj.with_master_weights(
            optax.chain(optax.clip_by_global_norm(1.0), gj.galore_adamw(1e-3, rank=4))
        ),
        "inject_hyperparams": optax.inject_hyperparams(
            gj.galore_adamw, static_args=gj.GALORE_ADAMW_STATIC_ARGS
        )(learning_rate=1e-3, rank=4, max_grad_norm=1.0),
        "inject_hyperparams_factory": optax.inject_hyperparams(
            lambda learning_rate: optax.chain(
                optax.clip_by_global_norm(1.0), optax.adam(learning_rate)
            )
        )(learning_rate=optax.linear_schedule(1e-3, 0.0, 10)),
        "previous_global": optax.chain(gj.clipping.clip_by_previous_global_norm(1.0), adam),
    }


@pytest.mark.parametrize("name", sorted(_clipped_optimizers()))
def test_global_norm_clip_inside_the_optimizer_is_one_clear_error(name):
    """Inside a layer-wise step the optimizer sees one layer: its "global" norm
    would be that layer's. Refused at construction, naming the step's own clip."""
    model, params, _ = _user_model()
    tx = _clipped_optimizers()[name]
    message = r"clips by a global norm itself \(.*1\.0\).*per layer.*clip='layer'"
    with pytest.raises(ValueError, match=message):
        gj.layerwise_step(tx, model, max_norm=1.0)
    with pytest.raises(ValueError, match=message):
        gj.layerwise_init(tx, model, params)


def test_per_leaf_optimizers_and_clips_are_accepted():
    model, params, _ = _user_model()
    labels = gj.labels.labels_by_path(gj.galore_labels(params, rank=4))
    for tx in [
        gj.galore_adamw(1e-3, rank=4, labels=labels),
        gj.tensor_galore_adamw(1e-3),
        optax.chain(optax.clip(1.0), optax.adaptive_grad_clip(0.1), optax.adamw(1e-3)),
        optax.inject_hyperparams(gj.galore_adamw, static_args=gj.GALORE_ADAMW_STATIC_ARGS)(
            learning_rate=optax.linear_schedule(1e-3, 0.0, 10), rank=2
        ),
    ]:
        gj.layerwise_step(tx, model, max_norm=1.0)
        gj.layerwise_init(tx, model, params)


# ----------------------------------------------------------------------------
# The start-up line: the optimizer state against AdamW's.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, ratio",
    [
        (["optimizer.name=adamw"], (0.99, 1.01)),
        ([*GALORE, "optimizer.layerwise=true", "optimizer.grad_clip_mode=layer"], (0.1, 0.9)),
    ],
    ids=["adamw", "galore-layerwise"],
)
def test_start_up_line_gives_the_state_against_adamw(overrides, ratio):
    config = load_config(str(REPO / "configs/llama_tiny.yaml"), [*TINY, *overrides])
    run = steps.build_run(config, jax.device_count())
    line = steps.describe_run(run).splitlines()[1]
    found = re.search(r"\(([\d.]+) MiB state\) = ([\d.]+)x AdamW's ([\d.]+) MiB", line)
    assert found, line
    state = gj.memory.optimizer_state_bytes(run.abstract_opt_state)
    adamw = gj.memory.adamw_state_bytes(run.abstract_params)  # 2 moments + a counter
    assert float(found.group(1)) == round(state / 2**20, 1)
    assert float(found.group(2)) == round(state / adamw, 2)
    assert float(found.group(3)) == round(adamw / 2**20, 1)
    assert ratio[0] < state / adamw < ratio[1]

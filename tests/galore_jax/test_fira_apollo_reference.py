"""Replays fira 1.0.2's FiraAdamW and apollo-torch 1.0.3's APOLLOAdamW (proj="svd")
trajectories (../shared/reference/fira_apollo_reference.npz) step by step."""

import json
import pathlib

import jax
import numpy as np
import optax
import pytest

import galore_jax as gj

# A copy travels with the repo (tests/data), so a clean clone (CI) replays it too;
# the shared file, where present, is the original.
_SHARED = (
    pathlib.Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "reference"
    / "fira_apollo_reference.npz"
)
_VENDORED = pathlib.Path(__file__).resolve().parents[1] / "data" / "fira_apollo_reference.npz"
REFERENCE = _SHARED if _SHARED.exists() else _VENDORED


def _load():
    if not REFERENCE.exists():
        pytest.skip(f"reference vectors not found at {REFERENCE}")
    return np.load(REFERENCE)


def _decay_after_step(lr: float, wd: float) -> optax.GradientTransformation:
    """The packages apply p -= lr*wd*p to the already-updated p."""

    def update_fn(updates, state, params):
        return jax.tree.map(lambda u, p: u - lr * wd * (p + u), updates, params), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


def _transform(meta):
    b1, b2 = meta["betas"]
    common = dict(
        update_proj_gap=meta["update_proj_gap"],
        scale=meta["scale"],
        proj_type=meta["proj_type"],
        svd="exact",
        base_optimizer=gj.scale_by_torch_adam(b1, b2, meta["eps"]),
        norm_growth_limit=None if meta["disable_nl"] else 1.01,
    )
    if meta["algo"] == "fira":
        return gj.scale_by_fira(meta["rank"], **common)
    return gj.scale_by_apollo(
        meta["rank"], scale_type=meta["scale_type"], scale_front=meta["scale_front"], **common
    )


def replay(data, case):
    """Per-step relative displacement errors ||p - p_ref|| / ||p_ref - p0||."""
    meta = json.loads(str(data[f"{case}/meta"]))
    tx = optax.chain(
        _transform(meta),
        optax.scale(-meta["lr"]),
        _decay_after_step(meta["lr"], meta["weight_decay"]),
    )
    p0 = data[f"{case}/p0"]
    grads, expected = data[f"{case}/grads"], data[f"{case}/params"]
    params, state = jax.numpy.asarray(p0), tx.init(jax.numpy.asarray(p0))
    step = jax.jit(tx.update)
    errors = []
    for t in range(meta["steps"]):
        updates, state = step(jax.numpy.asarray(grads[t]), state, params)
        params = optax.apply_updates(params, updates)
        ref = expected[t].astype(np.float64)
        diff = np.asarray(params, np.float64) - ref
        errors.append(float(np.linalg.norm(diff) / np.linalg.norm(ref - p0)))
    return meta, errors


@pytest.mark.parametrize("case", [f"case{k}" for k in range(7)])
def test_matches_fira_and_apollo_packages(case):
    data = _load()
    meta, errors = replay(data, case)
    what = f"{case} ({meta['algo']}, {meta['proj_type']}, {meta['scale_type']})"
    assert max(errors) <= 1e-3, f"{what}: per-step errors {errors}"


def test_the_limiter_matters_in_the_replay():
    """Switching the limiter off where the package had it on misses the trajectory
    (so the replay does test the limiter, and its bias-correction placement)."""
    data = _load()
    meta = json.loads(str(data["case0/meta"]))
    assert not meta["disable_nl"]
    data = {k: data[k] for k in data.files if k.startswith("case0/")}
    data["case0/meta"] = json.dumps(dict(meta, disable_nl=True))
    _, errors = replay(data, "case0")
    assert max(errors) > 1e-2

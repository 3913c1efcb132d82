"""Replays galore-torch 1.0's recorded trajectories (../shared/reference) step by step."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj

# A copy of ../shared/reference/galore_torch_reference.npz travels with the repo, so a
# clean clone (CI) replays it too; the shared file, where present, is the original.
_SHARED = (
    pathlib.Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "reference"
    / ("galore_torch_reference.npz")
)
_VENDORED = pathlib.Path(__file__).resolve().parents[1] / "data" / "galore_torch_reference.npz"
REFERENCE = _SHARED if _SHARED.exists() else _VENDORED


def _load_cases():
    if not REFERENCE.exists():
        pytest.skip(f"reference vectors not found at {REFERENCE}")
    data = np.load(REFERENCE)
    return data, sorted({k.split("/")[0] for k in data.files})


def _decay_after_step(lr: float, wd: float) -> optax.GradientTransformation:
    """galore-torch applies p -= lr*wd*p to the already-updated p."""

    def update_fn(updates, state, params):
        return jax.tree.map(lambda u, p: u - lr * wd * (p + u), updates, params), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


@pytest.mark.parametrize("case", [f"case{k}" for k in range(8)])
def test_matches_galore_torch(case):
    data, cases = _load_cases()
    assert case in cases
    meta = json.loads(str(data[f"{case}/meta"]))
    b1, b2 = meta["betas"]
    tx = optax.chain(
        gj.scale_by_galore(
            meta["rank"],
            update_proj_gap=meta["update_proj_gap"],
            scale=meta["scale"],
            proj_type=meta["proj_type"],
            svd="exact",
            base_optimizer=gj.scale_by_torch_adam(b1, b2, meta["eps"]),
        ),
        optax.scale(-meta["lr"]),
        _decay_after_step(meta["lr"], meta["weight_decay"]),
    )
    p0 = jnp.asarray(data[f"{case}/p0"])
    grads, expected = data[f"{case}/grads"], data[f"{case}/params"]
    params, state = p0, tx.init(p0)
    step = jax.jit(tx.update)
    errors = []
    for t in range(meta["steps"]):
        updates, state = step(jnp.asarray(grads[t]), state, params)
        params = optax.apply_updates(params, updates)
        ref = expected[t].astype(np.float64)
        err = np.linalg.norm(np.asarray(params, np.float64) - ref) / np.linalg.norm(
            ref - data[f"{case}/p0"]
        )
        errors.append(err)
    assert max(errors) <= 1e-3, f"{case} ({meta['proj_type']}): per-step errors {errors}"

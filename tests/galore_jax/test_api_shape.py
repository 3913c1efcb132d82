"""The public surface stays small and 0.2.0 code keeps working.

Guards the redesign's headline figures: at most 30 public names, at most 15
parameters on `galore_adamw`, no library module over 500 lines; and that the
keywords and names of galore-jax 0.2.0 still give the same optimizer (with a
DeprecationWarning naming the new spelling).
"""

import inspect
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import galore_jax as gj

LIBRARY = pathlib.Path(gj.__file__).parent


def test_public_names_and_parameter_counts_stay_small():
    assert len(gj.__all__) <= 30, gj.__all__
    assert all(hasattr(gj, name) for name in gj.__all__)
    assert len(inspect.signature(gj.galore_adamw).parameters) <= 15
    assert len(inspect.signature(gj.tensor_galore_adamw).parameters) <= 15
    assert len(inspect.signature(gj.scale_by_galore).parameters) <= 12
    for alias in (gj.fira_adamw, gj.apollo_adamw, gj.apollo_mini_adamw):
        assert len(inspect.signature(alias).parameters) <= 15, alias.__name__
    for transform in (gj.scale_by_fira, gj.scale_by_apollo):
        assert len(inspect.signature(transform).parameters) <= 13, transform.__name__
    # Linear algebra is a namespace, not flat names.
    assert "randomized_svd" not in gj.__all__ and callable(gj.linalg.randomized_svd)


def test_no_library_module_is_over_500_lines():
    sizes = {
        str(path.relative_to(LIBRARY)): len(path.read_text().splitlines())
        for path in LIBRARY.rglob("*.py")
    }
    assert max(sizes.values()) <= 500, {k: v for k, v in sizes.items() if v > 500}


def test_option_objects_are_hashable_and_checked():
    options = [
        gj.RandomizedSVD(oversample=4),
        gj.ExactSVD(),
        gj.ProjectorStorage(bits=4, group_size=256),
        gj.AdamOptions(b2=0.95, bits=8),
        gj.Tucker(rank=(4, None, 2)),
        gj.Labels(overrides={"head": "adam"}),
    ]
    assert len({hash(o) for o in options}) == len(options)
    assert gj.RandomizedSVD(oversample=4) == gj.RandomizedSVD(oversample=4)
    with pytest.raises(TypeError, match="RandomizedSVD.power_iters must be an int"):
        gj.RandomizedSVD(power_iters=1.5)
    with pytest.raises(ValueError, match="ProjectorStorage.dtype applies to bits=32"):
        gj.ProjectorStorage(bits=8, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"Tucker.rank\[1\] as a fraction must be in \(0, 1\]"):
        gj.Tucker(rank=(4, 1.5))
    with pytest.raises(ValueError, match="svd must be 'randomized', 'exact'"):
        gj.scale_by_galore(4, svd="lanczos")
    with pytest.raises(TypeError, match="adam must be None or gj.AdamOptions"):
        gj.galore_adamw(1e-3, adam={"b1": 0.9})


def _run(tx, params, steps=5):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        grads = jax.tree.map(lambda p: jnp.sin(p * (step + 1)) + 0.1 * p, params)
        updates, state = update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state


PARAMS = {
    "embed": jnp.linspace(-1, 1, 32 * 8).reshape(32, 8),
    "w": jnp.linspace(-1, 1, 16 * 12).reshape(16, 12),
    "t": jnp.linspace(-1, 1, 6 * 6 * 4).reshape(6, 6, 4),
    "norm": jnp.ones(8),
}


@pytest.mark.parametrize(
    "old,new",
    [
        (
            dict(
                rank=4,
                oversample=4,
                power_iters=2,
                warm_start=False,
                seed=3,
                b2=0.95,
                eps=1e-6,
                moment_bits=8,
                projector_bits=8,
                label_overrides={"embed": "galore"},
                tensor_rank=0.5,
                update_proj_gap=2,
            ),
            dict(
                rank=4,
                svd=gj.RandomizedSVD(oversample=4, power_iters=2, warm_start=False, seed=3),
                adam=gj.AdamOptions(b2=0.95, eps=1e-6, bits=8),
                projector=gj.ProjectorStorage(bits=8),
                labels=gj.Labels(overrides={"embed": "galore"}),
                tensor=gj.Tucker(rank=0.5, svd=gj.ExactSVD(seed=3)),  # 0.2.0: seed + 1
                update_proj_gap=2,
            ),
        ),
        (
            dict(rank=4, svd="exact", seed=1, update_proj_gap=2),
            dict(
                rank=4,
                svd=gj.ExactSVD(seed=1),
                tensor=gj.Tucker(svd=gj.ExactSVD(seed=1)),
                update_proj_gap=2,
            ),
        ),
    ],
    ids=["randomized_low_bit", "exact"],
)
def test_0_2_0_keywords_give_the_same_optimizer(old, new):
    with pytest.warns(DeprecationWarning, match="moved into option objects"):
        tx_old = gj.galore_adamw(1e-2, **old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        tx_new = gj.galore_adamw(1e-2, **new)
    got, state_old = _run(tx_old, PARAMS)
    want, state_new = _run(tx_new, PARAMS)
    for a, b in zip(jax.tree.leaves((got, state_old)), jax.tree.leaves((want, state_new))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_0_2_0_names_resolve_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"gj.exact_svd moved to galore_jax.linalg"):
        assert gj.exact_svd is gj.linalg.exact_svd
    with pytest.warns(DeprecationWarning, match="optimizer_state_bytes moved"):
        assert gj.optimizer_state_bytes is gj.memory.optimizer_state_bytes
    with pytest.warns(DeprecationWarning, match=r"ScaleByGaloreState moved to galore_jax.galore"):
        assert gj.ScaleByGaloreState is gj.galore.ScaleByGaloreState
    with pytest.warns(DeprecationWarning, match=r"moved to galore_jax.clipping"):
        assert gj.clip_by_layer_norm is gj.clipping.clip_by_layer_norm
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        gj.not_a_name  # noqa: B018

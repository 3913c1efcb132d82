"""Users' own models: Equinox modules, silent fallbacks, non-finite leaves, complex weights."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax as gj
from galore_jax._tucker_plan import tucker_ranks_for_fraction
from galore_jax.labels import RankFallbackWarning

eqx = pytest.importorskip("equinox")


class Spectral(eqx.Module):
    """A plain-JAX FNO-style spectral weight: complex (in, out, modes1, modes2)."""

    weight: jax.Array

    def __init__(self, key):
        re, im = jax.random.split(key)
        shape = (8, 8, 6, 6)
        self.weight = (
            (jax.random.normal(re, shape) + 1j * jax.random.normal(im, shape)) * 0.1
        ).astype(jnp.complex64)

    def __call__(self, x):  # x: (8, 6, 6) complex coefficients
        return jnp.einsum("ixy,ioxy->oxy", x, self.weight)


class Net(eqx.Module):
    mlp: eqx.nn.MLP
    spectral: Spectral

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.mlp = eqx.nn.MLP(16, 16, 64, 2, key=k1)
        self.spectral = Spectral(k2)

    def __call__(self, x, z):
        return self.mlp(x), self.spectral(z)


def _data():
    kx, kz, kt = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(kx, (32, 16))
    z = jax.random.normal(kz, (32, 8, 6, 6)).astype(jnp.complex64)
    target = Net(kt)
    y, w = jax.vmap(target)(x, z)
    return x, z, y, w


def _loss(model, x, z, y, w):
    y_hat, w_hat = jax.vmap(model)(x, z)
    return jnp.mean((y_hat - y) ** 2) + jnp.mean(jnp.abs(w_hat - w) ** 2)


@pytest.mark.parametrize("alias", ["galore_adamw", "tensor_galore_adamw"])
def test_equinox_model_trains_describes_and_round_trips_through_orbax(alias, tmp_path):
    import orbax.checkpoint as ocp

    model = Net(jax.random.PRNGKey(0))
    params = eqx.filter(model, eqx.is_array)
    inner = getattr(gj, alias)(3e-2, update_proj_gap=5, **({"rank": 4} if alias[0] == "g" else {}))
    tx = optax.chain(gj.conjugate_complex_grads(), inner)
    state = tx.init(params)  # used to run the model's own __call__ and crash

    rows = gj.describe(inner, params).by_path()
    assert rows["spectral/weight"].label == "tensor_galore"
    assert rows["spectral/weight"].side == "tucker"
    if alias == "galore_adamw":
        assert rows["mlp/layers/1/weight"].label == "galore"
        assert rows["mlp/layers/1/weight"].why == "matrix"
    assert rows["mlp/layers/0/bias"].why == "vector"

    @eqx.filter_jit
    def step(model, state, batch):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, *batch)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    batch = _data()
    losses = []
    for _ in range(20):
        model, state, loss = step(model, state, batch)
        losses.append(float(loss))
    assert losses[-1] < 0.85 * losses[0], losses

    params = eqx.filter(model, eqx.is_array)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
        ckpt.wait_until_finished()
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state}
        )
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    for a, b in zip(
        jax.tree.leaves(restored), jax.tree.leaves({"params": params, "opt_state": state})
    ):
        np.testing.assert_array_equal(a, b)


def test_rank_fallback_is_one_warning_per_optimizer_naming_the_leaves():
    params = {"w": jnp.ones((128, 128)), "v": jnp.ones((128, 64)), "u": jnp.ones((512, 256))}
    tx = gj.galore_adamw(1e-3, rank=128)  # the default rank on a 128-wide model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(2):
            _, state = update(params, state, params)
    fallbacks = [w for w in caught if issubclass(w.category, RankFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert "'w'" in message and "'v'" in message and "'u'" not in message
    assert "smaller rank" in message
    rows = gj.describe(tx, params).by_path()
    assert rows["w"].label == "adam" and "rank 128" in rows["w"].why
    assert rows["u"].label == "galore"


def test_rank_that_fits_gives_no_warning():
    params = {"w": jnp.ones((128, 128))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gj.galore_adamw(1e-3, rank=32).init(params)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_leaf_is_a_zero_gradient_and_poisons_no_other_leaf(bad, max_grad_norm):
    """Every leaf (plain Adam too) with a NaN / inf counts as a zero gradient for that
    step, and the clip factor comes from the finite leaves only."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "w": jax.random.normal(k[0], (32, 24)),
        "t": jax.random.normal(k[1], (6, 5, 4)),
        "b": jnp.zeros(24),
        "embed": jax.random.normal(k[2], (50, 24)),
    }
    tx = gj.galore_adamw(1e-2, rank=4, update_proj_gap=3, max_grad_norm=max_grad_norm)
    update = jax.jit(tx.update)
    s_bad = s_zero = tx.init(params)
    p_bad = p_zero = params
    for step in range(5):
        grads = jax.tree.map(lambda x: jnp.sin(x * (step + 1)) * 4.0, params)
        bad_grads, zero_grads = dict(grads), dict(grads)
        if step == 3:  # a refresh step
            bad_grads["b"] = grads["b"].at[2].set(bad)
            zero_grads["b"] = jnp.zeros_like(grads["b"])
        u_bad, s_bad = update(bad_grads, s_bad, p_bad)
        u_zero, s_zero = update(zero_grads, s_zero, p_zero)
        p_bad, p_zero = optax.apply_updates(p_bad, u_bad), optax.apply_updates(p_zero, u_zero)
    for name in params:
        assert np.isfinite(p_bad[name]).all(), name
        np.testing.assert_allclose(p_bad[name], p_zero[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_tensor_rank_that_does_not_fit_is_an_error_in_every_entry_point():
    w = {"spectral": jnp.ones((8, 8, 6, 6), jnp.complex64)}
    for make in (
        lambda r: gj.tensor_galore_adamw(1e-3, rank=r),
        lambda r: gj.galore_adamw(1e-3, tensor_rank=r),
        lambda r: gj.scale_by_tensor_galore(rank=r),
    ):
        with pytest.raises(ValueError, match=r"3 entries .*'spectral' has 4 modes"):
            make((4, 4, 2)).init(w)
        with pytest.raises(ValueError, match=r"mode 2 of 'spectral'.*mode size 6"):
            make((4, 4, 12, 12)).init(w)


def test_fractional_tucker_rank_is_a_fraction_of_the_entries():
    w = {"spectral": jnp.ones((24, 24, 8, 8), jnp.complex64)}
    for tx in (gj.tensor_galore_adamw(1e-3, rank=0.25), gj.scale_by_tensor_galore(rank=0.25)):
        assert gj.describe(tx, w).by_path()["spectral"].rank == (17, 17, 6, 6)
    per_mode = gj.scale_by_tensor_galore(rank=(0.25, 0.25, 0.25, 0.25))
    assert gj.describe(per_mode, w).by_path()["spectral"].rank == (6, 6, 2, 2)


def test_tucker_ranks_for_fraction_hold_that_fraction_of_the_entries():
    for shape, fraction in [((24, 24, 8, 8), 0.25), ((32, 32, 16), 0.25), ((16, 16, 6, 6), 0.5)]:
        ranks = tucker_ranks_for_fraction(shape, fraction)
        kept = math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))
        # Rounding each rank moves the count a little; the target is met roughly.
        assert 0.6 * fraction < kept / math.prod(shape) < 1.5 * fraction, (shape, ranks)
    assert tucker_ranks_for_fraction((24, 24, 8, 8), 0.25) == (17, 17, 6, 6)


def test_complex_weight_stored_as_real_pairs_is_warned_about():
    with pytest.warns(UserWarning, match="view_as_real"):
        gj.tensor_galore_adamw(1e-3).init({"spectral": jnp.ones((8, 8, 6, 2))})


def _complex_fit(tx, conjugate_by_hand=False, steps=200):
    """Least squares in a complex (4, 4, 3) weight through raw jax.grad."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    target = (jax.random.normal(k1, (4, 4, 3)) + 1j * jax.random.normal(k2, (4, 4, 3))).astype(
        jnp.complex64
    )
    x = jax.random.normal(k3, (16, 4)).astype(jnp.complex64)
    loss = lambda w: jnp.mean(jnp.abs(jnp.einsum("bi,ioj->boj", x, w - target)) ** 2)  # noqa: E731
    w = jnp.zeros_like(target)
    state = tx.init(w)

    @jax.jit
    def step(w, state):
        g = jax.grad(loss)(w)
        g = jnp.conj(g) if conjugate_by_hand else g
        u, state = tx.update(g, state, w)
        return optax.apply_updates(w, u), state

    for _ in range(steps):
        w, state = step(w, state)
    return float(loss(w)) / float(loss(jnp.zeros_like(w)))


def test_raw_complex_gradients_train_through_the_documented_chain():
    make = lambda: gj.tensor_galore_adamw(  # noqa: E731
        5e-2, rank=(4, 4, 3), scale=1.0, update_proj_gap=20
    )
    by_hand = _complex_fit(make(), conjugate_by_hand=True)
    documented = _complex_fit(optax.chain(gj.conjugate_complex_grads(), make()))
    raw = _complex_fit(make())
    assert documented < 0.01 and by_hand < 0.01, (documented, by_hand)
    assert documented == pytest.approx(by_hand, rel=1e-3)
    assert raw > 1.0  # what users saw: the raw gradient does not train (here it diverges)


def test_real_gradient_for_a_complex_param_is_an_error():
    w = jnp.ones((4, 4, 3), jnp.complex64)
    for tx in (gj.tensor_galore_adamw(1e-3), gj.conjugate_complex_grads()):
        with pytest.raises(ValueError, match="imaginary part would never be updated"):
            tx.update(jnp.ones((4, 4, 3)), tx.init(w), w)

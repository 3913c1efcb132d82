"""Tests for models/fno.py: spectral convolution against a direct DFT, FNO shapes,
jit/grad with complex weights, and that the FNO learns Burgers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.fno import FNO, FNOConfig, SpectralConv, conjugate_complex_grads, relative_l2
from tasks.fno import pde


def dft_matrix(n: int, frequencies) -> np.ndarray:
    """Rows exp(-2 pi i k j / n) for the given k: forward DFT restricted to them."""
    k = np.asarray(frequencies)[:, None]
    j = np.arange(n)[None, :]
    return np.exp(-2j * np.pi * k * j / n)


def real_inverse_weights(n: int, frequencies) -> np.ndarray:
    """Multiplicity of each non-negative frequency in a real signal's spectrum.

    A real signal's spectrum is Hermitian, so frequency k in (0, n/2) stands for k
    and -k (weight 2); 0 and the Nyquist n/2 stand for themselves (weight 1). The
    inverse is then (1/n) Re(sum_k c_k X_k e^{2 pi i k j / n}), which also drops
    the imaginary parts at 0 and n/2, exactly as irfft does.
    """
    k = np.asarray(frequencies)
    return np.where((k == 0) | (2 * k == n), 1.0, 2.0)


def numpy_spectral_conv_1d(x, weight):
    batch, n, _ = x.shape
    modes = weight.shape[-1]
    k = np.arange(modes)
    x_hat = np.einsum("kj,bji->bki", dft_matrix(n, k), x)
    out_hat = np.einsum("bki,iok->bko", x_hat, weight) * real_inverse_weights(n, k)[:, None]
    inverse = dft_matrix(n, k).conj().T  # (j, k): exp(+2 pi i k j / n)
    return np.real(np.einsum("jk,bko->bjo", inverse, out_hat)) / n


def numpy_spectral_conv_2d(x, w_pos, w_neg):
    batch, nx, ny, _ = x.shape
    mx, my = w_pos.shape[-2:]
    kx = np.concatenate([np.arange(mx), np.arange(nx - mx, nx)])  # both corners
    ky = np.arange(my)
    fx, fy = dft_matrix(nx, kx), dft_matrix(ny, ky)
    x_hat = np.einsum("ap,cq,npqi->naci", fx, fy, x)  # (batch, kx, ky, in)
    weight = np.concatenate([w_pos, w_neg], axis=2)  # (in, out, 2 mx, my)
    out_hat = np.einsum("naci,ioac->naco", x_hat, weight)
    out_hat = out_hat * real_inverse_weights(ny, ky)[None, None, :, None]
    y = np.einsum("pa,qc,naco->npqo", fx.conj().T, fy.conj().T, out_hat)
    return np.real(y) / (nx * ny)


# One compiled program per shape is faster than op-by-op dispatch on CPU.
apply = nnx.jit(lambda module, x: module(x))


def complex_normal(shape, seed):
    # NumPy draws: no PRNG kernel to compile per shape.
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), jnp.complex64)


def to64(a):
    return np.asarray(a).astype(np.complex128 if np.iscomplexobj(a) else np.float64)


@pytest.mark.parametrize("n, modes", [(16, 5), (16, 9)])  # 9 = n // 2 + 1 keeps Nyquist
def test_spectral_conv_1d_matches_numpy_dft(n, modes):
    conv = SpectralConv(3, 2, (modes,), rngs=nnx.Rngs(0))
    # Weights of both signs, so nothing cancels by accident.
    conv.spectral_weight[...] = complex_normal(conv.spectral_weight.shape, seed=1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, n, 3)), jnp.float32)
    got = apply(conv, x)
    want = numpy_spectral_conv_1d(to64(x), to64(conv.spectral_weight[...]))
    assert got.shape == (2, n, 2) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("shape, modes", [((12, 10), (3, 4)), ((12, 10), (6, 6))])
def test_spectral_conv_2d_matches_numpy_dft(shape, modes):
    conv = SpectralConv(3, 2, modes, rngs=nnx.Rngs(0))
    conv.spectral_weight_pos[...] = complex_normal(conv.spectral_weight_pos.shape, seed=1)
    conv.spectral_weight_neg[...] = complex_normal(conv.spectral_weight_neg.shape, seed=2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, *shape, 3)), jnp.float32)
    got = apply(conv, x)
    want = numpy_spectral_conv_2d(
        to64(x), to64(conv.spectral_weight_pos[...]), to64(conv.spectral_weight_neg[...])
    )
    assert got.shape == (2, *shape, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_spectral_weights_are_complex64_with_reference_init():
    conv = SpectralConv(4, 5, (3, 2), rngs=nnx.Rngs(0))
    for w in (conv.spectral_weight_pos[...], conv.spectral_weight_neg[...]):
        assert w.shape == (4, 5, 3, 2) and w.dtype == jnp.complex64
        for part in (w.real, w.imag):
            assert float(part.min()) >= 0 and float(part.max()) < 1 / 20
    assert not np.allclose(conv.spectral_weight_pos[...], conv.spectral_weight_neg[...])


def test_spectral_conv_rejects_too_many_modes():
    # Shapes of the DFT tests above, so the initialisers are already compiled.
    conv1 = SpectralConv(3, 2, (5,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="modes"):
        conv1(jnp.ones((1, 6, 3)))  # 6 // 2 + 1 = 4 frequencies
    conv2 = SpectralConv(3, 2, (3, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"modes\[0\]"):
        conv2(jnp.ones((1, 5, 8, 3)))  # needs n_x >= 6
    with pytest.raises(ValueError, match=r"modes\[1\]"):
        conv2(jnp.ones((1, 8, 4, 3)))  # 4 // 2 + 1 = 3 frequencies


@pytest.mark.parametrize(
    "field, value",
    [
        ("dim", 3),
        ("width", 0),
        ("modes", (4, 4, 4)),
        ("modes", 0),
        ("num_layers", -1),
        ("activation", "swish2"),
        ("padding", -1),
        ("param_dtype", "int32"),
        ("lifting_channels", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FNOConfig(**{"dim": 2, field: value})


CONFIG_2D = FNOConfig(
    dim=2,
    in_channels=1,
    out_channels=2,
    width=8,
    modes=[3, 4],
    num_layers=2,
    projection_channels=16,
)


def test_fno_shapes_and_resolution_independence():
    config1 = FNOConfig(
        dim=1,
        in_channels=2,
        out_channels=3,
        width=8,
        modes=4,
        num_layers=2,
        projection_channels=16,
        lifting_channels=8,
        padding=2,
    )
    model1 = FNO(config1, rngs=nnx.Rngs(0))

    def out_shape(model, shape):
        # Tracing fixes every shape; eval_shape skips compiling (execution is tested below).
        return jax.eval_shape(model, jax.ShapeDtypeStruct(shape, jnp.float32)).shape

    for n in (16, 40):
        assert out_shape(model1, (2, n, 2)) == (2, n, 3)
    model2 = FNO(CONFIG_2D, rngs=nnx.Rngs(0))
    for shape in ((8, 12), (20, 16)):
        assert out_shape(model2, (3, *shape, 1)) == (3, *shape, 2)
    with pytest.raises(ValueError, match="expects input"):
        model2(jnp.ones((3, 8, 8, 2)))


def test_fno_jit_and_complex_gradients():
    config = CONFIG_2D
    model = FNO(config, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.float32)

    def loss_fn(params):
        return relative_l2(nnx.merge(graphdef, params)(x), y)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    loss_fn = jax.jit(loss_fn)
    spectral = {
        (layer, name): grads["spectral"][layer][name][...]
        for layer in range(config.num_layers)
        for name in ("spectral_weight_pos", "spectral_weight_neg")
    }
    for path, g in spectral.items():
        assert g.dtype == jnp.complex64, path
        assert bool(jnp.all(jnp.isfinite(g.real) & jnp.isfinite(g.imag)))
        assert float(jnp.abs(g.imag).max()) > 0
    # One SGD step on conjugated gradients lowers the loss.
    optimizer = optax.sgd(1e-2)
    updates, _ = optimizer.update(conjugate_complex_grads(grads), optimizer.init(params))
    assert float(loss_fn(optax.apply_updates(params, updates))) < float(loss)


def test_conjugate_complex_grads_makes_optax_descend():
    # d|z|^2: jax.grad gives 2 conj(z); sgd needs 2 z.
    z = jnp.asarray([1.0 + 2.0j], jnp.complex64)
    grads = jax.grad(lambda z: jnp.sum(jnp.abs(z) ** 2))(z)
    fixed = conjugate_complex_grads({"z": grads, "r": jnp.ones(2)})
    np.testing.assert_allclose(fixed["z"], 2 * z)
    np.testing.assert_array_equal(fixed["r"], jnp.ones(2))


@pytest.mark.slow  # the default suite trains it with Tensor-GaLore (test_fno_task)
def test_fno_learns_burgers():
    x, y = pde.burgers_dataset(144, 64, seed=0)
    x_train, y_train, x_test, y_test = x[:112], y[:112], x[112:], y[112:]
    trivial = float(relative_l2(jnp.broadcast_to(y_train.mean(0), y_test.shape), y_test))
    # u(T) is ~50x smaller than u0 (viscous decay): normalise both ends.
    x_norm = pde.UnitGaussianNormalizer.fit(x_train)
    y_norm = pde.UnitGaussianNormalizer.fit(y_train)

    config = FNOConfig(dim=1, width=16, modes=8, num_layers=3, projection_channels=32)
    model = FNO(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    steps, batch = 200, 16
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, steps))
    opt_state = optimizer.init(params)

    def loss_fn(params, xb, yb):
        prediction = y_norm.decode(nnx.merge(graphdef, params)(x_norm.encode(xb)))
        return relative_l2(prediction, yb)

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = optimizer.update(conjugate_complex_grads(grads), opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for step in range(steps):
        i = (step * batch) % x_train.shape[0]
        params, opt_state, _ = train_step(
            params, opt_state, x_train[i : i + batch], y_train[i : i + batch]
        )
    test_error = float(jax.jit(loss_fn)(params, x_test, y_test))
    # Zero-shot super-resolution: the same seed gives the same functions on 128 points.
    x_fine, y_fine = pde.burgers_dataset(144, 128, seed=0)
    fine_error = float(jax.jit(loss_fn)(params, x_fine[112:], y_fine[112:]))
    print(
        f"burgers test relative L2: FNO {test_error:.4f} (at 128 points {fine_error:.4f}), "
        f"mean predictor {trivial:.4f}"
    )
    assert trivial > 0.5
    assert test_error < 0.1 * trivial, (test_error, trivial)
    assert fine_error < 0.1 * trivial, (fine_error, trivial)

"""Tests for models/llama.py (tiny shapes: the CPU is shared)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.llama import (
    DEFAULT_LOGICAL_RULES,
    Llama,
    LlamaConfig,
    apply_rotary,
    count_params,
    layer_axis_tree,
    logical_axes,
    logical_partition_specs,
    rotary_tables,
)

TINY = LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_heads=4,
    num_kv_heads=2,
    num_layers=2,
    max_seq_len=16,
)
BATCH, SEQ = 2, 8


def make(**overrides) -> Llama:
    return Llama(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(0))


def tokens(seed=0, batch=BATCH, seq=SEQ, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


def param_arrays(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def copy_stacked_into_unrolled(stacked: Llama, unrolled: Llama):
    """Gives `unrolled` the same weights as `stacked` (layer i = slice i)."""
    stacked_params = nnx.state(stacked, nnx.Param)
    nnx.update(unrolled.token_embedding, stacked_params["token_embedding"])
    nnx.update(unrolled.lm_head, stacked_params["lm_head"])
    nnx.update(unrolled.final_norm, stacked_params["final_norm"])
    layer_params = nnx.state(stacked.layers, nnx.Param)
    for i, layer in enumerate(unrolled.layers):
        nnx.update(layer, jax.tree.map(lambda a: a[i], layer_params))


@nnx.jit
def forward(model, x):
    return model(x)


@pytest.fixture(scope="module")
def model():
    return make()


def test_logits_shape_and_dtype(model):
    logits = forward(model, tokens())
    assert logits.shape == (BATCH, SEQ, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_params_are_stacked_2d_matrices(model):
    shapes = jax.tree.map(lambda a: a.shape, param_arrays(model))
    L, E, H, KV, M = 2, 32, 4 * 8, 2 * 8, 48
    assert shapes["layers"]["attention"] == {
        "q_proj": (L, E, H),
        "k_proj": (L, E, KV),
        "v_proj": (L, E, KV),
        "o_proj": (L, H, E),
    }
    assert shapes["layers"]["mlp"] == {
        "gate_proj": (L, E, M),
        "up_proj": (L, E, M),
        "down_proj": (L, M, E),
    }
    assert shapes["layers"]["attention_norm"]["scale"] == (L, E)
    assert shapes["token_embedding"] == (61, E) and shapes["lm_head"] == (E, 61)
    assert count_params(model) == sum(
        int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    )


def test_init_distributions(model):
    params = param_arrays(model)
    np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["layers"]["mlp_norm"]["scale"], 1.0)
    std = float(jnp.std(params["layers"]["mlp"]["gate_proj"]))
    assert 0.015 < std < 0.025
    # Layers are initialised independently (split rngs), not copies of each other.
    q = params["layers"]["attention"]["q_proj"]
    assert not np.allclose(q[0], q[1])


def test_causal(model):
    base = tokens(seed=1)
    t = 4
    changed = base.at[:, t + 1].set((base[:, t + 1] + 7) % TINY.vocab_size)
    before, after = forward(model, base), forward(model, changed)
    np.testing.assert_allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)
    assert not np.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_gqa_equals_mha_with_repeated_kv_heads(model):
    """GQA must behave like MHA whose k/v heads are copies of the shared ones."""
    mha = make(num_kv_heads=TINY.num_heads)
    group = TINY.num_heads // TINY.num_kv_heads

    def repeat_heads(w):  # (layers, embed, kv * head_dim) -> (layers, embed, heads * head_dim)
        layers, embed, _ = w.shape
        heads = w.reshape(layers, embed, TINY.num_kv_heads, TINY.head_dim)
        return jnp.repeat(heads, group, axis=2).reshape(layers, embed, -1)

    gqa_params = param_arrays(model)
    attention = gqa_params["layers"]["attention"]
    attention["k_proj"] = repeat_heads(attention["k_proj"])
    attention["v_proj"] = repeat_heads(attention["v_proj"])
    nnx.update(mha, gqa_params)
    x = tokens(seed=2)
    np.testing.assert_allclose(forward(model, x), forward(mha, x), atol=1e-5)


def test_rotary_depends_only_on_relative_position():
    cos, sin = rotary_tables(8, 8, 10000.0)
    q = jax.random.normal(jax.random.key(0), (8,))
    k = jax.random.normal(jax.random.key(1), (8,))
    qs = apply_rotary(jnp.broadcast_to(q, (1, 8, 1, 8)), cos, sin)[0, :, 0]
    ks = apply_rotary(jnp.broadcast_to(k, (1, 8, 1, 8)), cos, sin)[0, :, 0]
    np.testing.assert_allclose(qs[5] @ ks[3], qs[2] @ ks[0], rtol=1e-5)
    np.testing.assert_allclose(qs[0], q, rtol=1e-6)  # position 0 is unrotated


def test_scan_equals_unrolled(model):
    unrolled = make(scan_layers=False)
    copy_stacked_into_unrolled(model, unrolled)
    x = tokens(seed=3)
    np.testing.assert_allclose(forward(model, x), forward(unrolled, x), atol=1e-5)


def test_remat_same_logits_and_grads(model):
    plain, remat = model, make(remat=True)
    x = tokens(seed=4)

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(x), axis=-1))

    loss_and_grads = nnx.jit(nnx.value_and_grad(loss))
    loss_plain, grads_plain = loss_and_grads(plain)
    loss_remat, grads_remat = loss_and_grads(remat)
    np.testing.assert_allclose(loss_plain, loss_remat, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        nnx.to_pure_dict(grads_plain),
        nnx.to_pure_dict(grads_remat),
    )


def test_remat_unrolled_same_logits(model):
    unrolled = make(scan_layers=False, remat=True)
    copy_stacked_into_unrolled(model, unrolled)
    x = tokens(seed=4)
    np.testing.assert_allclose(forward(model, x), forward(unrolled, x), atol=1e-5)


def test_bfloat16_params_and_compute():
    model = make(param_dtype="bfloat16", dtype="bfloat16")
    dtypes = set(a.dtype for a in jax.tree.leaves(param_arrays(model)))
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    logits = forward(model, tokens())
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_logical_axes_specs_and_layer_axes(model):
    axes = logical_axes(model)
    assert axes["layers"]["attention"]["q_proj"] == P("layers", "embed", "heads")
    assert axes["layers"]["attention"]["k_proj"] == P("layers", "embed", "kv_heads")
    assert axes["layers"]["attention"]["o_proj"] == P("layers", "heads", "embed")
    assert axes["layers"]["mlp"]["down_proj"] == P("layers", "mlp", "embed")
    assert axes["layers"]["mlp_norm"]["scale"] == P("layers", "norm")
    assert axes["token_embedding"] == P("vocab", "embed")
    assert axes["lm_head"] == P("embed", "vocab")
    assert axes["final_norm"]["scale"] == P("norm")

    specs = logical_partition_specs(model, DEFAULT_LOGICAL_RULES)
    assert specs["layers"]["attention"]["q_proj"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["mlp"]["down_proj"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attention_norm"]["scale"] == P(None, None)
    assert specs["token_embedding"] == P("tensor", "fsdp")
    # Same structure as the param state (what nnx.Optimizer hands to optax).
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    assert jax.tree.structure(specs) == jax.tree.structure(pure)

    with pytest.raises(TypeError, match="pure arrays"):
        logical_partition_specs(pure)

    layer_axes = layer_axis_tree(model)
    assert layer_axes["layers"]["mlp"]["gate_proj"] == 0
    assert layer_axes["layers"]["attention_norm"]["scale"] == 0
    assert layer_axes["lm_head"] is None and layer_axes["token_embedding"] is None
    is_none = lambda x: x is None  # noqa: E731
    assert (
        jax.tree.structure(layer_axes, is_leaf=is_none).num_leaves
        == jax.tree.structure(pure).num_leaves
    )


@pytest.mark.skipif(not hasattr(nnx, "set_graph_mode"), reason="flax without tree mode")
def test_tree_mode_keeps_layer_axis_names(model):
    """nnx.vmap drops transform_metadata in tree mode; the model must not."""
    with nnx.set_graph_mode(False):
        tree_model = make()
    assert logical_axes(tree_model)["layers"]["mlp"]["up_proj"] == P("layers", "embed", "mlp")
    np.testing.assert_allclose(forward(tree_model, tokens()), forward(model, tokens()), atol=1e-6)


def test_unrolled_model_has_no_layer_axis():
    model = make(scan_layers=False)
    layer_axes = layer_axis_tree(model)
    assert all(a is None for a in jax.tree.leaves(layer_axes, is_leaf=lambda x: x is None))
    specs = logical_partition_specs(model)
    assert specs["layers"][1]["attention"]["q_proj"] == P("fsdp", "tensor")


def test_partition_specs_drop_axes_that_do_not_divide():
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    abstract = nnx.eval_shape(lambda: Llama(TINY, rngs=nnx.Rngs(0)))
    specs = logical_partition_specs(abstract, DEFAULT_LOGICAL_RULES, mesh=mesh)
    assert specs["lm_head"] == P("fsdp", None)  # vocab 61 is not divisible by 4
    assert specs["layers"]["attention"]["k_proj"] == P(None, "fsdp", "tensor")
    # A rule naming a mesh axis the mesh lacks is dropped too.
    specs = logical_partition_specs(abstract, (("embed", "missing"),), mesh=mesh)
    assert specs["lm_head"] == P(None, None)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_forward_matches_single_device(model, axis_type):
    kind = jax.sharding.AxisType.Auto if axis_type == "auto" else jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(kind,) * 3)
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), logical_partition_specs(params, mesh=mesh)
    )
    sharded = jax.device_put(params, shardings)
    assert sharded["layers"]["attention"]["q_proj"][...].sharding.spec == P(None, "fsdp", "tensor")

    def apply(params, x):
        return nnx.merge(graphdef, params)(x)

    if axis_type == "explicit":
        # The model annotates no activation shardings: under Explicit axes run
        # it in auto mode (the partitioner decides), as a training step would.
        apply = jax.sharding.auto_axes(apply, out_sharding=P("data"))
    x = tokens(seed=5, batch=4)
    with jax.set_mesh(mesh):
        out = jax.jit(apply)(sharded, jax.device_put(x, NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(out, forward(model, x), atol=1e-5)


def test_sequence_longer_than_max_raises(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(seq=TINY.max_seq_len + 1))


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 30),  # not divisible by num_heads=4
        ("num_kv_heads", 3),  # num_heads=4 not divisible by 3
        ("num_layers", 0),
        ("vocab_size", -1),
        ("param_dtype", "float64"),
        ("dtype", "int8"),
        ("attention_implementation", "flash"),
    ],
)
def test_bad_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_num_kv_heads_defaults_to_num_heads():
    config = LlamaConfig(
        vocab_size=8, hidden_size=16, intermediate_size=16, num_heads=2, num_layers=1, max_seq_len=4
    )
    assert config.num_kv_heads == 2

"""A LLaMA decoder in Flax NNX with logical sharding axes.

The model follows the LLaMA architecture: token embedding, pre-norm decoder
layers (RMSNorm -> causal grouped-query self-attention with rotary position
embeddings -> residual; RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and
an untied LM head.

Design points that other code relies on:

* Every projection is a plain 2-D matrix per layer (``q_proj`` is
  ``(embed, heads * head_dim)``, not ``(embed, heads, head_dim)``), so GaLore
  sees ordinary matrices. With ``scan_layers=True`` the per-layer params are
  stacked with a leading layer axis, ``(num_layers, m, n)``; the optimizer
  treats such a leaf as ``num_layers`` independent matrices (see
  :func:`layer_axis_tree`).
* Every param carries its logical axis names in the standard NNX
  ``out_sharding`` metadata (the same place ``nnx.with_partitioning`` puts
  them), e.g. ``("layers", "embed", "heads")`` for a stacked ``q_proj``.
  :func:`logical_partition_specs` maps them to mesh axes with a rules table
  such as :data:`DEFAULT_LOGICAL_RULES`. Params are created *unsharded*
  (``eager_sharding=False``) so the model can be built without a mesh; shard
  the state afterwards (``jax.device_put`` or ``jax.jit(out_shardings=...)``).
* Attention is ``jax.nn.dot_product_attention(..., is_causal=True)``; set
  ``LlamaConfig.attention_implementation="cudnn"`` on GPUs (bf16/fp16 compute)
  to get cuDNN flash attention.

Param paths (``nnx.state(model, nnx.Param)``)::

    token_embedding                      (vocab, embed)
    layers/attention_norm/scale          ([layers,] norm)
    layers/attention/{q,k,v,o}_proj      ([layers,] embed, heads|kv_heads) / (heads, embed)
    layers/mlp_norm/scale                ([layers,] norm)
    layers/mlp/{gate,up,down}_proj       ([layers,] embed, mlp) / (mlp, embed)
    final_norm/scale                     (norm,)
    lm_head                              (embed, vocab)

With ``scan_layers=False``, ``layers`` is an ``nnx.List`` and paths carry the
layer index: ``layers/0/attention/q_proj``.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128,
    ...                      num_heads=4, num_kv_heads=2, num_layers=2, max_seq_len=32)
    >>> model = Llama(config, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 259)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "DEFAULT_LOGICAL_RULES",
    "Llama",
    "LlamaConfig",
    "count_params",
    "layer_axis_tree",
    "logical_axes",
    "logical_partition_specs",
]

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
_ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")

LAYERS_AXIS = "layers"

# Logical axis name -> mesh axis (or None = replicated). Weights are sharded
# FSDP-style over their embedding dim and tensor-parallel over heads / mlp /
# vocab; the stacked layer axis stays unsharded so scan slices it locally.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    (LAYERS_AXIS, None),
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a :class:`Llama` model.

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Model (embedding) width.
        intermediate_size: Hidden width of the SwiGLU MLP.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads (grouped-query attention);
            ``None`` means ``num_heads`` (plain multi-head attention).
        num_layers: Number of decoder layers.
        max_seq_len: Longest sequence the model accepts.
        rope_theta: Base of the rotary embedding frequencies.
        norm_eps: Epsilon of RMSNorm.
        param_dtype: Storage dtype of params: "float32", "bfloat16" or "float16".
        dtype: Compute dtype (same choices). Logits are always float32.
        scan_layers: Stack layer params with a leading "layers" axis and run
            them with ``nnx.scan`` (fast compile); otherwise unroll a list.
        remat: Rematerialise each layer's activations in the backward pass.
        attention_implementation: Passed to ``jax.nn.dot_product_attention``:
            None (XLA), "xla" or "cudnn" (GPU flash attention, bf16/fp16 only).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    max_seq_len: int
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    attention_implementation: Literal["xla", "cudnn"] | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            # Frozen dataclass: fill the default through object.__setattr__.
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "num_layers",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.hidden_size / num_heads = {self.head_dim} must be even "
                "(rotary embeddings rotate pairs of features)."
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"LlamaConfig.{name} must be one of {sorted(_DTYPES)}, "
                    f"got {getattr(self, name)!r}."
                )
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}.")
        if not self.norm_eps > 0:
            raise ValueError(f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps!r}.")
        if self.attention_implementation not in _ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                "LlamaConfig.attention_implementation must be one of "
                f"{_ATTENTION_IMPLEMENTATIONS}, got {self.attention_implementation!r}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]


_normal_init = nnx.initializers.normal(stddev=0.02)


def _param(rngs: nnx.Rngs, shape, names, dtype, init=_normal_init) -> nnx.Param:
    """A Param annotated with logical axis names (NNX ``out_sharding`` metadata).

    ``eager_sharding=False``: the names are logical, not mesh axes, so they must
    not be applied at creation time (that needs a mesh and rules); callers shard
    the state later with :func:`logical_partition_specs`.
    """
    return nnx.Param(
        init(rngs.params(), shape, dtype), out_sharding=tuple(names), eager_sharding=False
    )


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale (computed in float32)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.eps = config.norm_eps
        self.dtype = config.jnp_dtype
        self.scale = _param(
            rngs,
            (config.hidden_size,),
            ("norm",),
            config.jnp_param_dtype,
            init=nnx.initializers.ones,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables, float32[seq_len, head_dim // 2], for positions 0..seq_len-1."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates feature pairs (i, i + head_dim/2) of x[batch, seq, heads, head_dim].

    This is the "rotate half" layout of the HF LLaMA implementation.
    """
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dtype = config.jnp_dtype
        self.implementation = config.attention_implementation
        embed, pdt = config.hidden_size, config.jnp_param_dtype
        q_width = config.num_heads * config.head_dim
        kv_width = config.num_kv_heads * config.head_dim
        self.q_proj = _param(rngs, (embed, q_width), ("embed", "heads"), pdt)
        self.k_proj = _param(rngs, (embed, kv_width), ("embed", "kv_heads"), pdt)
        self.v_proj = _param(rngs, (embed, kv_width), ("embed", "kv_heads"), pdt)
        self.o_proj = _param(rngs, (q_width, embed), ("heads", "embed"), pdt)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        batch, seq, _ = x.shape
        dt = self.dtype
        q = (x @ self.q_proj[...].astype(dt)).reshape(batch, seq, self.num_heads, self.head_dim)
        k = (x @ self.k_proj[...].astype(dt)).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = (x @ self.v_proj[...].astype(dt)).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        # Handles num_kv_heads < num_heads itself (GQA), no need to repeat k/v.
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=self.implementation
        )
        return out.reshape(batch, seq, self.num_heads * self.head_dim) @ self.o_proj[...].astype(dt)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.dtype = config.jnp_dtype
        embed, mlp, pdt = config.hidden_size, config.intermediate_size, config.jnp_param_dtype
        self.gate_proj = _param(rngs, (embed, mlp), ("embed", "mlp"), pdt)
        self.up_proj = _param(rngs, (embed, mlp), ("embed", "mlp"), pdt)
        self.down_proj = _param(rngs, (mlp, embed), ("mlp", "embed"), pdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate = jax.nn.silu(x @ self.gate_proj[...].astype(dt))
        return (gate * (x @ self.up_proj[...].astype(dt))) @ self.down_proj[...].astype(dt)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def _prepend_layers_axis_name(stacked: nnx.Module) -> None:
    """Makes sure every stacked param's logical names start with "layers".

    ``nnx.vmap(transform_metadata=...)`` adds the name only in graph mode with
    graph updates; in tree mode (``nnx.set_graph_mode(False)``) it is ignored.
    Doing it here (idempotently) keeps the names right under either mode.
    """
    for _, node in nnx.iter_graph(stacked):
        if isinstance(node, nnx.Variable):
            names = tuple(node.get_metadata().get("out_sharding", None) or ())
            if len(names) == node.ndim - 1:
                node.set_metadata(out_sharding=(LAYERS_AXIS, *names))


def _apply_layer(layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return layer(x, cos, sin)


class Llama(nnx.Module):
    """LLaMA decoder-only language model.

    Args:
        config: Model shape and numerics.
        rngs: Must provide a ``params`` stream (``nnx.Rngs(0)`` does).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = config.jnp_param_dtype
        self.token_embedding = _param(
            rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pdt
        )
        if config.scan_layers:
            # One DecoderLayer whose params carry a leading layer axis; vmap
            # adds "layers" in front of every param's logical axis names.
            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(
                in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS}
            )
            def make_stacked_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(config, rngs=layer_rngs)

            self.layers = make_stacked_layers(rngs)
            _prepend_layers_axis_name(self.layers)
        else:
            self.layers = nnx.List(
                [DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
            )
        self.final_norm = RMSNorm(config, rngs=rngs)
        self.lm_head = _param(
            rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pdt
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits.

        Args:
            tokens: int[batch, seq] token ids, seq <= config.max_seq_len.

        Returns:
            float32[batch, seq, vocab_size] logits; position t sees tokens <= t.
        """
        config = self.config
        x = self.embed(tokens)
        cos, sin = rotary_tables(tokens.shape[1], config.head_dim, config.rope_theta)
        apply_layer = nnx.remat(_apply_layer) if config.remat else _apply_layer
        if config.scan_layers:

            def scan_body(x, layer):
                return apply_layer(layer, x, cos, sin)

            run_layers = nnx.scan(
                scan_body,
                in_axes=(nnx.Carry, 0),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS},
            )
            x = run_layers(x, self.layers)
        else:
            for layer in self.layers:
                x = apply_layer(layer, x, cos, sin)
        return self.logits(x)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """int[batch, seq] tokens -> the first layer's input [batch, seq, hidden]."""
        config = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}.")
        if tokens.shape[1] > config.max_seq_len:
            raise ValueError(
                f"Sequence length {tokens.shape[1]} exceeds "
                f"LlamaConfig.max_seq_len={config.max_seq_len}."
            )
        return jnp.take(self.token_embedding[...], tokens, axis=0).astype(config.jnp_dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        """The last layer's output -> float32 logits (final norm, LM head)."""
        x = self.final_norm(x)
        # float32 logits (accumulated in f32 even for bf16 compute) for a stable loss.
        return jnp.dot(
            x, self.lm_head[...].astype(self.config.jnp_dtype), preferred_element_type=jnp.float32
        )


# ----------------------------------------------------------------------------
# Logical axes, partition specs, layer axes
# ----------------------------------------------------------------------------


def _param_state(model_or_state: Any) -> nnx.State:
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    return model_or_state


def _map_params(fn, model_or_state: Any):
    """Maps ``fn(variable)`` over every Param, keeping the State's structure.

    The result has the structure of ``nnx.as_pure(nnx.state(model, nnx.Param))``
    (what ``nnx.Optimizer`` hands the optax transform), so it is also a valid
    pytree prefix of the Variable-wrapped state for ``jax.jit`` shardings.
    """
    return jax.tree.map(
        fn, _param_state(model_or_state), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def _names_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    if not isinstance(variable, nnx.Variable):
        raise TypeError(
            "Expected a model or nnx.state(model, nnx.Param) (Variables carry the logical "
            f"axis names), got a {type(variable).__name__} leaf: pure arrays have no names."
        )
    names = variable.get_metadata().get("out_sharding", None)
    if not names:
        return (None,) * variable.ndim
    return tuple(names)


def logical_axes(model_or_state: Any) -> nnx.State:
    """Logical axis names of every param, as PartitionSpecs of logical names.

    Args:
        model_or_state: A Llama (or any NNX module) or ``nnx.state(model, nnx.Param)``.

    Returns:
        A State shaped like ``nnx.as_pure(nnx.state(model, nnx.Param))`` with
        ``PartitionSpec("layers", "embed", "heads")``-style leaves (a
        PartitionSpec is a pytree leaf, a plain tuple would not be).
    """
    return _map_params(lambda v: jax.sharding.PartitionSpec(*_names_of(v)), model_or_state)


def logical_partition_specs(
    model_or_state: Any,
    rules=DEFAULT_LOGICAL_RULES,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> nnx.State:
    """PartitionSpecs of every param from its logical axis names and a rules table.

    Args:
        model_or_state: A Llama, or ``nnx.state(model, nnx.Param)`` (possibly
            abstract, from ``nnx.eval_shape``).
        rules: Sequence of ``(logical_name, mesh_axis_or_None)``; a mesh axis may
            also be a tuple of mesh axes. Names without a rule are replicated.
            A mesh axis already used by an earlier dim of the same param is not
            reused (a PartitionSpec may name each mesh axis once).

    Returns:
        A State with the structure of ``nnx.as_pure(nnx.state(model, nnx.Param))``
        holding ``jax.sharding.PartitionSpec`` leaves. Wrapped as
        ``NamedSharding(mesh, spec)`` it is a valid pytree prefix of
        ``nnx.state(model, nnx.Param)`` for ``jax.device_put`` and
        ``jax.jit(in_shardings=..., out_shardings=...)``.

    Example:
        >>> specs = logical_partition_specs(model)              # doctest: +SKIP
        >>> specs["layers"]["attention"]["q_proj"]              # doctest: +SKIP
        PartitionSpec(None, 'fsdp', 'tensor')
    """
    table = dict(rules)
    mesh_sizes = dict(mesh.shape) if mesh is not None else None

    def to_spec(variable):
        used: set[str] = set()
        spec = []
        for dim, name in zip(variable.shape, _names_of(variable)):
            mesh_axis = table.get(name) if name is not None else None
            axes = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis or ())
            if any(a in used for a in axes):
                mesh_axis = None
            elif mesh_sizes is not None and not _divides(axes, dim, mesh_sizes):
                mesh_axis = None
            else:
                used.update(axes)
            spec.append(mesh_axis)
        return jax.sharding.PartitionSpec(*spec)

    return _map_params(to_spec, model_or_state)


def _divides(mesh_axes, dim: int, mesh_sizes: dict) -> bool:
    if any(a not in mesh_sizes for a in mesh_axes):
        return False
    ways = 1
    for a in mesh_axes:
        ways *= mesh_sizes[a]
    return dim % ways == 0


def layer_axis_tree(model_or_state: Any) -> nnx.State:
    """Index of the stacked "layers" axis of every param (None if it has none).

    Args:
        model_or_state: A Llama or ``nnx.state(model, nnx.Param)``.

    Returns:
        A State shaped like ``nnx.as_pure(nnx.state(model, nnx.Param))`` with
        int or None leaves. JAX treats None as an empty subtree, so map over it
        with ``is_leaf=lambda x: x is None`` (or flatten with the same is_leaf).
    """

    def axis_of(variable):
        names = _names_of(variable)
        return names.index(LAYERS_AXIS) if LAYERS_AXIS in names else None

    return _map_params(axis_of, model_or_state)


def count_params(model: nnx.Module) -> int:
    """Total number of parameter elements."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

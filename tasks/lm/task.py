"""``task: lm``: language modelling with the LLaMA model (next-token cross-entropy,
perplexity) on the token data of :mod:`tasks.lm.data`, and the model's layer
structure for layer-wise updates (:func:`scanned_model`)."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import optax
from flax import nnx

import galore_jax as gj
from models import llama
from tasks.lm import data as data_lib
from training.config import Config, ConfigError
from training.task import Task


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def llama_config(config: Config, tokenizer_vocab: int) -> llama.LlamaConfig:
    """The model's ``LlamaConfig`` from the ``model`` section.

    ``model.vocab_size: null`` means the tokenizer's vocabulary rounded up to
    ``model.vocab_multiple`` (padding ids are never targets).
    """
    m = config.model
    vocab_size = m.vocab_size or _round_up(tokenizer_vocab, m.vocab_multiple)
    if vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size ({vocab_size}) is smaller than the "
            f"tokenizer's vocabulary ({tokenizer_vocab})"
        )
    try:
        return llama.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            num_layers=m.num_layers,
            max_seq_len=m.max_seq_len,
            rope_theta=m.rope_theta,
            norm_eps=m.norm_eps,
            param_dtype=m.param_dtype,
            dtype=m.dtype,
            scan_layers=m.scan_layers,
            remat=m.remat,
            attention_implementation=m.attention_implementation,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def perplexity_metrics(mean_loss: float) -> dict:
    """``val_loss`` and ``val_ppl`` (perplexity capped to stay finite in JSON)."""
    return {"val_loss": mean_loss, "val_ppl": math.exp(min(mean_loss, 700.0))}


def cross_entropy(model, batch) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of ``batch`` under ``model``."""
    return token_cross_entropy(model(batch["inputs"]), batch)


def token_cross_entropy(logits, batch) -> jax.Array:
    """Mean cross-entropy of ``logits`` against ``batch["targets"]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def build_lm_task(config: Config) -> Task:
    """Loads the token data and describes the LLaMA LM task.

    Raises:
        ConfigError: missing data path, unreadable or empty corpus, a corpus
            too small for ``seq_len`` x ``batch_size``, bad model shape.
    """
    try:
        tokens = data_lib.load_tokens(config.data)
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        raise ConfigError(f"data: {e}") from None
    model_config = llama_config(config, tokens.vocab_size)
    micro_batch = config.batch_size // config.grad_accum_steps
    try:
        train_iterator = data_lib.TokenBatchIterator(
            tokens.train,
            global_batch_size=config.batch_size,
            seq_len=config.seq_len,
            seed=config.seed,
        )
        # Checked now so a too-small validation split fails before training.
        data_lib.eval_batches(tokens.val, micro_batch, config.seq_len, 1)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None

    def eval_batches():
        return data_lib.eval_batches(tokens.val, micro_batch, config.seq_len, config.eval_batches)

    return Task(
        name="lm",
        make_model=lambda rngs: llama.Llama(model_config, rngs=rngs),
        partition_specs=lambda params, rules: llama.logical_partition_specs(params, rules),
        default_rules=llama.DEFAULT_LOGICAL_RULES,
        layer_axes=llama.layer_axis_tree,
        loss_fn=cross_entropy,
        eval_loss_fn=cross_entropy,
        summarize_eval=perplexity_metrics,
        scanned_model=lambda model: scanned_model(model, token_cross_entropy),
        train_iterator=train_iterator,
        eval_batches=eval_batches,
        units_per_batch=config.batch_size * config.seq_len,
        units_name="tokens",
        description=(
            f"data: {config.data.source} | {len(tokens.train):,} train / "
            f"{len(tokens.val):,} val tokens | vocab {tokens.vocab_size} "
            f"(model {model_config.vocab_size})"
            + (f" | {tokens.skipped_files} binary file(s) skipped" if tokens.skipped_files else "")
        ),
    )


def scanned_model(model: llama.Llama, loss_fn: Callable[[jax.Array, Any], jax.Array]):
    """The `galore_jax.ScannedModel` of a scanned Llama, for layer-wise updates.

    Args:
        model: a Llama with ``scan_layers=True`` (abstract, from ``nnx.eval_shape``,
            is enough: only its structure is used).
        loss_fn: ``(logits, batch) -> scalar`` mean loss; ``batch["inputs"]`` are
            the tokens.

    Returns:
        ``ScannedModel`` over ``nnx.as_pure(nnx.state(model, nnx.Param))``:
        ``token_embedding`` before the layers, ``final_norm`` and ``lm_head`` after.
    """
    if not model.config.scan_layers:
        raise ValueError("layer-wise updates need LlamaConfig.scan_layers=True (stacked layers)")
    config = model.config
    layer_def = nnx.split(model.layers, nnx.Param)[0]
    head_def = nnx.split(_Head(model), nnx.Param)[0]

    def embed(params, batch):
        return _Embed(params["token_embedding"], config).embed(batch["inputs"])

    def layer(params, x):
        cos, sin = llama.rotary_tables(x.shape[1], config.head_dim, config.rope_theta)
        return nnx.merge(layer_def, params)(x, cos, sin)

    def head(params, x, batch):
        return loss_fn(nnx.merge(head_def, params).logits(x), batch)

    return gj.ScannedModel(
        embed,
        layer,
        head,
        layers_key="layers",
        before=("token_embedding",),
        after=("final_norm", "lm_head"),
    )


class _Embed:
    """`models.llama.Llama.embed` on the embedding table alone."""

    def __init__(self, table: jax.Array, config: llama.LlamaConfig):
        self.config = config
        self.token_embedding = table

    embed = llama.Llama.embed


class _Head(nnx.Module):
    """`models.llama.Llama.logits` on the final norm and LM head alone (same param paths)."""

    def __init__(self, model: llama.Llama):
        self.config = model.config
        self.final_norm = model.final_norm
        self.lm_head = model.lm_head

    logits = llama.Llama.logits

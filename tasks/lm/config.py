"""The config of ``task: lm``: the LLaMA ``model`` section, the token ``data`` section
and :class:`LMConfig`, the run config that holds them (``training.config.Config``'s
task-agnostic sections, plus these).

The ``model`` section is what the user writes, not ``models.llama.LlamaConfig``:
it has keys the model does not (``vocab_multiple``; ``vocab_size: null``, the
tokenizer's vocabulary rounded up, known only once the data is loaded) and keeps
``num_kv_heads: null`` as written (the model fills it in), so ``config.yaml`` and
checkpoints record the user's settings. Its shape rules are the model's own:
``LlamaModelConfig`` builds a ``LlamaConfig`` to check them and renames the keys
in its messages (``model.hidden_size``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from training.config import (
    _SECTION,
    Bool,
    Config,
    ConfigError,
    Float,
    Pos,
    Str,
    _fail,
    _Section,
)


@dataclass(config=_SECTION)
class LlamaModelConfig(_Section):
    """LLaMA shape for ``task: lm``; checked by ``models.llama.LlamaConfig``.

    ``vocab_size: null`` takes the tokenizer's vocabulary size rounded up to a
    multiple of ``vocab_multiple`` (so the vocab dim splits over mesh axes;
    the padding ids are never targets).
    """

    vocab_size: Optional[Pos] = None
    vocab_multiple: Pos = 64
    hidden_size: Pos = 128
    intermediate_size: Pos = 344
    num_layers: Pos = 2
    num_heads: Pos = 4
    num_kv_heads: Optional[Pos] = None  # None: same as num_heads (no GQA)
    max_seq_len: Pos = 256
    rope_theta: Float = Field(10000.0, gt=0)
    norm_eps: Float = Field(1e-6, gt=0)
    scan_layers: Bool = True  # stack layers on a leading axis and scan them
    remat: Bool = False  # recompute activations in the backward pass
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_implementation: Optional[Literal["xla", "cudnn"]] = None

    @model_validator(mode="after")
    def _float16(self) -> LlamaModelConfig:
        # float16 params (with or without a float32 master copy) give a non-finite
        # loss within a few steps: nothing here scales the loss or the gradients.
        _fail(
            self.param_dtype == "float16",
            "model.param_dtype=float16 is not supported (without loss scaling the loss "
            "is not finite within a few steps); use model.param_dtype=bfloat16 with "
            "optimizer.master_dtype=float32, or model.param_dtype=float32",
        )
        return self

    @model_validator(mode="after")
    def _shape(self) -> LlamaModelConfig:
        from models import llama  # the one home of the head/GQA/RoPE shape rules

        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(llama.LlamaConfig)
            if hasattr(self, f.name)
        }
        try:
            llama.LlamaConfig(**dict(fields, vocab_size=self.vocab_size or self.vocab_multiple))
        except ValueError as e:  # name the keys as the user writes them: model.<field>
            names = "|".join(f.name for f in dataclasses.fields(self))
            raise ConfigError(
                re.sub(rf"(?:LlamaConfig\.)?\b({names})\b", r"model.\1", str(e)).rstrip(".")
            ) from None
        return self


@dataclass(config=_SECTION)
class TextDataConfig(_Section):
    """Token data for ``task: lm`` (read by ``tasks.lm.data.load_tokens``).

    ``source``: ``builtin`` (the embedded Python-stdlib corpus), ``text`` (a
    UTF-8 file, or a directory of text files of any extension, read recursively;
    binary files are skipped and counted), ``jsonl`` (one JSON object per line,
    text under ``jsonl_field``) or ``bin`` (a pre-tokenized token array). The
    tokenizer is ``byte`` or a path to a Hugging Face ``tokenizer.json``.
    """

    source: Literal["builtin", "text", "jsonl", "bin"] = "builtin"
    path: Optional[Str] = None
    tokenizer: Str = "byte"
    jsonl_field: Str = "text"
    bin_dtype: Str = "uint16"
    val_fraction: Float = Field(0.05, gt=0, lt=1)
    max_corpus_bytes: Optional[Pos] = None  # cap on the builtin corpus (fast tests)

    @model_validator(mode="after")
    def _path(self) -> TextDataConfig:
        _fail(
            self.source != "builtin" and self.path is None,
            f"data.path is required for data.source={self.source!r}",
        )
        return self


@dataclass(config=_SECTION)
class LMConfig(Config):
    """``task: lm``: a LLaMA on token data."""

    scanned_layers: ClassVar[bool] = True  # optimizer.layerwise=true is allowed

    task: Literal["lm"] = "lm"
    model: LlamaModelConfig = dataclasses.field(default_factory=LlamaModelConfig)
    data: TextDataConfig = dataclasses.field(default_factory=TextDataConfig)

    def build_task(self):
        """The LLaMA LM task (loads the token data): ``tasks.lm.task.build_lm_task``."""
        from tasks.lm.task import build_lm_task  # lazily: it imports jax and the model

        return build_lm_task(self)

    def check_mesh(self, mesh_shape: dict[str, int]) -> None:
        """Attention heads (query and key/value) split over the ``tensor`` axis."""
        model = self.model
        for name, value in (
            ("model.num_heads", model.num_heads),
            ("model.num_kv_heads", model.num_kv_heads or model.num_heads),
        ):
            _fail(
                value % mesh_shape["tensor"],
                f"{name} ({value}) must be divisible by mesh.tensor ({mesh_shape['tensor']})",
            )

    @model_validator(mode="after")
    def _positions(self) -> LMConfig:
        _fail(
            self.seq_len > self.model.max_seq_len,
            f"seq_len ({self.seq_len}) is longer than the model's positions "
            f"(model.max_seq_len={self.model.max_seq_len})",
        )
        _fail(
            self.optimizer.layerwise and not self.model.scan_layers,
            "optimizer.layerwise=true needs stacked layers: set model.scan_layers=true",
        )
        return self

"""The peers in PyTorch: galore-torch's GaLoreAdamW and torch AdamW on the same LLaMA.

The same LLaMA shape and batch as ``benchmarks/train_step.py`` (read from the
same ``configs/llama_*.yaml`` with the same overrides), as a minimal PyTorch
model written here to match ``models/llama.py``: token embedding, pre-norm
layers of RMSNorm -> causal GQA attention with rotary embeddings (rotate-half
layout) -> residual, RMSNorm -> SwiGLU MLP -> residual, final RMSNorm, untied
LM head; bias-free linears, N(0, 0.02) init; optional per-layer activation
checkpointing (``model.remat``) and bf16 autocast (``model.dtype: bfloat16``).

Optimizers (one subprocess each, so CUDA memory and its peak are their own):
  adamw         torch.optim.AdamW (fused on CUDA)
  galore_torch  galore_torch.GaLoreAdamW; GaLore on the attention and MLP
                matrices (galore-torch's own recipe), plain AdamW on the rest

A step is forward, backward, global-norm clipping (``optimizer.grad_clip``),
``optimizer.step()``, ``zero_grad``. Timing and columns are those of
train_step.py: step 0 left out, ``windows * gap`` steps timed with
``torch.cuda.synchronize``; galore-torch refreshes (a full SVD per matrix) at
its steps 0, gap, 2 gap, ...

Runs only where ``torch`` and ``galore_torch`` import; otherwise prints
``skipped: ...`` and exits 0. galore-torch 1.0 imports ``transformers`` (and, for
its 8-bit optimizer, ``bitsandbytes``, which this script does without):
    pip install torch galore-torch transformers

    python benchmarks/peer_torch.py --config configs/llama_tiny.yaml --batch-size 8 --gap 10
    python benchmarks/peer_torch.py --config configs/llama_1b.yaml --batch-size 32 \\
        --seq-len 256 --gap 200 --windows 1 --out runs/bench/peer_torch_1b.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import time
import types

import _common as common

OPTIMIZERS = ("adamw", "galore_torch")
NEEDS = {"adamw": ("torch",), "galore_torch": ("torch", "galore_torch")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_shared_args(p, "--config")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    common.add_shared_args(p, "--batch-size", "--seq-len", "--gap", "--rank")
    common.add_windows_arg(p, help="refresh windows of `gap` steps to time")
    common.add_overrides_arg(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    common.add_shared_args(p, "--peak-tflops")
    common.add_out_arg(p, "peer_torch")
    common.add_shared_args(p, "--timeout")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.check_windows(p, args)
    return args


def galore_adamw_class():
    """galore_torch.GaLoreAdamW.

    galore-torch 1.0's ``__init__`` also imports its 8-bit optimizer, which needs
    bitsandbytes (a large CUDA wheel this benchmark does not use). Where that
    import fails, load ``galore_torch.adamw`` on its own: an empty package
    module with the installed package's path, so the package ``__init__`` is
    skipped and ``adamw``'s relative imports still resolve.
    """
    try:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW
    except ImportError as e:
        if "bitsandbytes" not in str(e):
            raise
    spec = importlib.util.find_spec("galore_torch")
    package = types.ModuleType("galore_torch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = package
    return importlib.import_module("galore_torch.adamw").AdamW


def missing_modules(optimizers) -> list[str]:
    missing = []
    for module in sorted({m for name in optimizers for m in NEEDS[name]}):
        try:
            if module == "galore_torch":
                galore_adamw_class()
            else:
                importlib.import_module(module)
        except Exception as e:  # ImportError, or a dependency of it missing / broken
            missing.append(f"{module} ({type(e).__name__}: {e})")
    return missing


def load_config(args):
    from tasks.registry import load_config as load

    overrides = common.base_overrides(args)  # no --accum here: one micro-batch per step
    return load(args.config, overrides), overrides


def vocab_size(config) -> int:
    """models/llama.py's vocabulary: the tokenizer's, rounded up to vocab_multiple."""
    if config.model.vocab_size:
        return config.model.vocab_size
    from tasks.lm.data import make_tokenizer

    vocab = make_tokenizer(config.data.tokenizer).vocab_size
    multiple = config.model.vocab_multiple
    return -(-vocab // multiple) * multiple


# ---------------------------------------------------------------------------
# A minimal PyTorch LLaMA with models/llama.py's shapes (child process only)
# ---------------------------------------------------------------------------


def build_model(config, vocab: int):
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    m = config.model
    d, f, heads = m.hidden_size, m.intermediate_size, m.num_heads
    kv_heads = m.num_kv_heads or heads
    head_dim = d // heads

    def linear(n_in, n_out):
        layer = nn.Linear(n_in, n_out, bias=False)
        nn.init.normal_(layer.weight, std=0.02)
        return layer

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + m.norm_eps)
            return (normed * self.weight.float()).to(x.dtype)

    def apply_rotary(x, cos, sin):  # x: [batch, seq, heads, head_dim], rotate-half layout
        half = x.shape[-1] // 2
        x32 = x.float()
        x1, x2 = x32[..., :half], x32[..., half:]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = linear(d, heads * head_dim)
            self.k_proj = linear(d, kv_heads * head_dim)
            self.v_proj = linear(d, kv_heads * head_dim)
            self.o_proj = linear(heads * head_dim, d)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q = apply_rotary(self.q_proj(x).view(b, s, heads, head_dim), cos, sin)
            k = apply_rotary(self.k_proj(x).view(b, s, kv_heads, head_dim), cos, sin)
            v = self.v_proj(x).view(b, s, kv_heads, head_dim)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                enable_gqa=kv_heads != heads,
            )
            return self.o_proj(out.transpose(1, 2).reshape(b, s, heads * head_dim))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = linear(d, f), linear(d, f), linear(f, d)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class DecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm, self.attention = RMSNorm(), Attention()
            self.mlp_norm, self.mlp = RMSNorm(), MLP()

        def forward(self, x, cos, sin):
            x = x + self.attention(self.attention_norm(x), cos, sin)
            return x + self.mlp(self.mlp_norm(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = nn.Embedding(vocab, d)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            self.layers = nn.ModuleList(DecoderLayer() for _ in range(m.num_layers))
            self.final_norm = RMSNorm()
            self.lm_head = linear(d, vocab)
            inv_freq = 1.0 / (m.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
            angles = torch.arange(m.max_seq_len).float()[:, None] * inv_freq[None, :]
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

        def forward(self, tokens):
            seq = tokens.shape[1]
            cos, sin = self.cos[:seq], self.sin[:seq]
            x = self.token_embedding(tokens)
            for layer in self.layers:
                if m.remat and self.training:
                    x = checkpoint(layer, x, cos, sin, use_reentrant=False)
                else:
                    x = layer(x, cos, sin)
            return self.lm_head(self.final_norm(x)).float()

    return Llama()


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer state, GaLore projectors included."""
    import torch

    def size(obj, seen) -> int:
        if isinstance(obj, torch.Tensor):
            key = obj.data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(size(v, seen) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v, seen) for v in obj)
        if hasattr(obj, "ortho_matrix"):  # galore_torch.GaLoreProjector
            return size(obj.ortho_matrix, seen)
        return 0

    seen: set = set()
    return sum(size(s, seen) for s in optimizer.state.values())


def run_child(name: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    config, overrides = load_config(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    vocab = vocab_size(config)
    model = build_model(config, vocab).to(device)
    model.train()
    opt_cfg = config.optimizer
    betas = (opt_cfg.adam.b1, opt_cfg.adam.b2)
    if name == "adamw":
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=opt_cfg.lr,
            betas=betas,
            eps=opt_cfg.adam.eps,
            weight_decay=opt_cfg.weight_decay,
            fused=device.type == "cuda",
        )
        galore_count = 0
    else:
        GaLoreAdamW = galore_adamw_class()
        galore_params, regular = [], []
        for pname, p in model.named_parameters():
            is_target = p.ndim == 2 and (".attention." in pname or ".mlp." in pname)
            (galore_params if is_target else regular).append(p)
        galore_count = len(galore_params)
        optimizer = GaLoreAdamW(
            [
                {"params": regular},
                {
                    "params": galore_params,
                    "rank": opt_cfg.rank,
                    "update_proj_gap": opt_cfg.update_proj_gap,
                    "scale": opt_cfg.scale,
                    "proj_type": opt_cfg.proj_type,
                },
            ],
            lr=opt_cfg.lr,
            betas=betas,
            eps=opt_cfg.adam.eps,
            weight_decay=opt_cfg.weight_decay,
            no_deprecation_warning=True,
        )

    autocast = config.model.dtype == "bfloat16"
    generator = torch.Generator().manual_seed(config.seed)
    batches = [
        torch.randint(0, vocab, (config.batch_size, config.seq_len + 1), generator=generator).to(
            device
        )
        for _ in range(4)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [p for p in model.parameters()]

    def step(tokens):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        if opt_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    gap = opt_cfg.update_proj_gap
    total = 1 + args.windows * gap
    times, losses = [], []
    for i in range(total):
        sync()
        start = time.perf_counter()
        loss = step(batches[i % len(batches)])
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))

    refreshing = {i for i in range(total) if i % gap == 0} if name == "galore_torch" else set()
    median, refresh_s, amortized = common.step_time_stats(times, refreshing, gap)

    num_params = sum(p.numel() for p in model.parameters())
    embedding = model.token_embedding.weight.numel()
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "optimizer": name,
        "device": {"platform": device.type, "device_kind": kind, "torch": torch.__version__},
        "config": args.config,
        "overrides": overrides,
        "model": common.llama_model_fields(config.model, scan_layers=False),
        "params": num_params,
        "vocab_size": vocab,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "tokens_per_step": config.batch_size * config.seq_len,
        "optimizer_config": {
            "rank": opt_cfg.rank,
            "update_proj_gap": gap,
            "scale": opt_cfg.scale,
            "proj_type": opt_cfg.proj_type,
        },
        "num_galore_params": galore_count,
        "windows": args.windows,
        "first_step_s": times[0],
        "median_step_s": median,
        "refresh_step_s": refresh_s,
        "amortized_step_s": amortized,
        "max_step_s": max(times[1:]),
        **common.step_throughput(config, num_params, embedding, amortized, kind, args.peak_tflops),
        "state_bytes": state_bytes(optimizer),
        "peak_device_bytes": (
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        ),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": all(math.isfinite(x) for x in losses),
        "step_times_s": times,
    }


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    # Reuse train_step.py's columns and ratio rules (the base is torch AdamW here).
    import train_step

    return train_step.table(results)


def header(results: list[dict]) -> str:
    """The line above the table: device, model shape, batch and GaLore settings."""
    r = results[0]
    return (
        f"{r['device']['device_kind']} (torch {r['device']['torch']}); {r['config']}: "
        f"{common.model_summary(r)}; batch {r['batch_size']} x "
        f"{r['seq_len']} tokens; rank {r['optimizer_config']['rank']}, gap "
        f"{r['optimizer_config']['update_proj_gap']}; {r['windows']} window(s) timed after "
        "step 0. Ratios are to torch AdamW (refresh step: to AdamW's step)."
    )


# The flags (besides --config, --windows, --set) a child needs to rebuild its run.
CHILD_KEYS = ("batch_size", "seq_len", "gap", "rank", "device", "peak_tflops")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        common.print_child_result(run_child(args.child, args))
        return 0
    missing = missing_modules(args.optimizers)
    if missing:
        print(
            "skipped: the PyTorch peers need "
            + "; ".join(missing)
            + ". Install them (pip install torch galore-torch transformers) to "
            "run this benchmark."
        )
        return 0

    results = common.run_optimizer_children(__file__, args, common.child_argv(args, CHILD_KEYS))
    if not results:
        return 1
    common.print_step_report(header(results), table(results), results)
    common.write_json(args.out, common.payload("peer_torch", results=results))
    return 0 if len(results) == len(args.optimizers) else 1


if __name__ == "__main__":
    sys.exit(main())

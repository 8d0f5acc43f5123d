"""The one GPT of the tests and the benchmarks: nanoGPT's pre-norm blocks, two sizes.

- `TinyGPT`: small enough for exact per-example gradients of 20k examples in seconds (tests), with the
  parameter layouts `per_example` must handle: nanoGPT's `wpe(arange(T))`, minGPT's bare `pos_emb`, a ViT-style
  `cls_token` prepended by expand + cat, and an lm_head tied to `wte`. Attention by an explicit masked softmax,
  which `torch.func.vmap` takes.
- `GPT`: nanoGPT's GPT-2 (`benchmarks/gpu_overhead.py` times GPT-2 small on a GPU): `n_layer` blocks with
  `scaled_dot_product_attention`, nanoGPT's initialisation, lm_head tied to `wte`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm block: causal self-attention through Linear layers (fused qkv projection), then an MLP.

    With `block_size`, attention is a softmax under a stored causal mask; without, torch's fused
    `scaled_dot_product_attention(is_causal=True)`.
    """

    def __init__(self, d: int, n_head: int, block_size: int | None = None):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.c_attn, self.c_proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln_2, self.c_fc, self.c_out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        if block_size is not None:
            mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
            self.register_buffer("bias", mask)
        else:
            self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
            y = att @ v
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.c_out(F.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings (nanoGPT's `wpe(arange(T))` and minGPT's bare `pos_emb`), a ViT-style
    `cls_token` prepended by expand + cat, one block, a final LayerNorm and an lm_head tied to `wte`."""

    def __init__(self, vocab: int = 16, block_size: int = 8, d: int = 8, n_head: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.pos_emb = nn.Parameter(0.1 * torch.randn(1, block_size, d))
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.block, self.ln_f = Block(d, n_head, block_size + 1), nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)) + self.pos_emb[:, :T]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return self.lm_head(self.ln_f(self.block(x)))[:, 1:]  # (B, T, vocab): next-token logits


class GPT(nn.Module):
    "nanoGPT's GPT-2: token and position embeddings (`wpe(arange(T))`), pre-norm blocks, lm_head tied to wte."

    def __init__(self, n_layer: int, n_head: int, d: int, vocab: int, block: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # nanoGPT's init: residual projections scaled down by depth
            if p.dim() > 1:
                residual = name.endswith(("c_proj.weight", "c_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if residual else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    "Mean over the batch of each sequence's mean token loss."
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def markov_tokens(n: int, vocab: int = 16, block_size: int = 8, seed: int = 0):
    "(inputs, next tokens) of n sequences from a random sparse Markov chain: something to learn."
    gen = torch.Generator().manual_seed(seed)
    trans = torch.softmax(3 * torch.randn(vocab, vocab, generator=gen), 1)
    seq = torch.empty(n, block_size + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(block_size):
        seq[:, t + 1] = torch.multinomial(trans[seq[:, t]], 1, generator=gen).squeeze(1)
    return seq[:, :-1], seq[:, 1:]

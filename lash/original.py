"""The model of the original implementation, restated step by step in eager PyTorch.

It keeps the original code's derived buffers (``rope.inv_freq``, ``causal_mask``) in its state dict,
as that code's checkpoints do, and computes attention by hand. Tests use it to check that
LASH loads such checkpoints strictly and reproduces their outputs; benchmarks use it, with a
per-layer ``F.cross_entropy``, as the eager baseline LASH is measured against.
"""

import math

import torch
from torch import nn


class OriginalRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class OriginalRoPE(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, x):
        T = x.shape[-2]
        freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


class OriginalAttention(nn.Module):
    def __init__(self, dim, num_heads, max_len=128):
        super().__init__()
        self.h, self.hd = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.rope = OriginalRoPE(self.hd)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_len, max_len)).bool())

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.h, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rope(q), self.rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        scores = scores.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
        y = scores.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class OriginalGLU(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, ffn_dim, bias=False), nn.Linear(ffn_dim, dim, bias=False), nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x):
        a = self.w1(x)
        return self.w2(a * torch.sigmoid(a) * self.w3(x))


class OriginalBlock(nn.Module):
    def __init__(self, dim, num_heads, max_len=128):
        super().__init__()
        self.attn, self.ffn = OriginalAttention(dim, num_heads, max_len), OriginalGLU(dim, 4 * dim)
        self.norm1, self.norm2 = OriginalRMSNorm(dim), OriginalRMSNorm(dim)

    def forward(self, h):
        h = self.norm1(h + self.attn(h))
        return self.norm2(h + self.ffn(h))


class OriginalModel(nn.Module):
    def __init__(self, vocab_size, dim, num_layers, num_heads, max_len=128):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(OriginalBlock(dim, num_heads, max_len) for _ in range(num_layers))
        self.output_head = nn.Linear(dim, vocab_size, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)  # random norm weights too, so a wrong mapping shows

    def all_logits(self, x):
        h, out = self.embedding(x), []
        for layer in self.layers:
            h = layer(h)
            out.append(self.output_head(h))
        return out

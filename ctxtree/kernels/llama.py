"""A compact LLaMA-family decoder in plain PyTorch.

RMSNorm, RoPE (default, linear and llama3 scaling), GQA attention on torch SDPA,
SwiGLU MLP, optional q/k/v (and o) bias, tied embeddings, a preallocated KV cache
and left-padded batches. Module names follow HF checkpoints (`embed_tokens`,
`layers.{i}.self_attn.q_proj`, ..., `norm`, `lm_head`) minus the leading `model.`.

Shape letters: B batch, T query length, S key length, H query heads, Hkv key/value
heads, Dh head size, D hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxtree.kernels.config import LlamaConfig

# Called between self-attention and the MLP of layer i: (i, h [B,T,D]) -> h.
# This is where the injection decoder adds its cross-attention.
LayerHook = Callable[[int, Tensor], Tensor]
# Called in the self-attention of layer i with its normed input x [B,T,D]: None, or deltas
# (dq [B,T,H*Dh], dv [B,T,Hkv*Dh]) added to the query and value projections (low-rank
# adapters of the injection decoder's upper layers).
AttentionDelta = Callable[[int, Tensor], "tuple[Tensor, Tensor] | None"]


@dataclass
class AttentionPrefix:
    """Keys and values [L,B,Hkv,P,Dh] (keys rotated to positions before the sequence's first)
    that join the self-attention of layers first..first+L-1 in one softmax with the layer's
    own keys, as a prompt prefix outside the KV cache would (the injection decoder's reading
    layers); valid [B,P] is False on padding."""
    keys: Tensor
    values: Tensor
    valid: Tensor
    first: int

    def mask(self, own: Tensor | None, b: int, t: int, s_own: int) -> Tensor:
        """[B,1,T,P+S] the prefix columns first, then the own mask ([B,1,T,S] or None: causal)."""
        device = self.valid.device
        if own is None:
            query_pos = torch.arange(s_own - t, s_own, device=device)
            own = (torch.arange(s_own, device=device)[None, :] <= query_pos[:, None])[None, None]
        return torch.cat([self.valid[:, None, None, :].expand(b, 1, t, -1), own.expand(b, 1, t, s_own)], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 like HF, then cast back before the weight (HF's order).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: LlamaConfig) -> Tensor:
    """Inverse frequencies [Dh/2] in fp32, with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        factor = cfg.rope_factor
        old_len = cfg.rope_original_max_position
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, T, Dh] for integer positions [B, T] (negative positions rotate backwards)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, Dh/2], fp32 like HF
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, Dh] by cos/sin [B, T, Dh] (HF's rotate-half convention)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
    """SDPA with GQA. q [B,H,T,Dh], k/v [B,Hkv,S,Dh], mask bool [B,1,T,S] (True = may attend).

    Every query row must have at least one True in its mask: a fully masked row
    gives NaN, and 0 * NaN poisons whatever reads it later.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None,
        enable_gqa=q.shape[1] != k.shape[1])


@dataclass
class KVCache:
    """Preallocated self-attention cache for a batch.

    keys/values: per layer [B, Hkv, S_max, Dh]; valid [B, S_max] marks slots that
    hold real tokens (left padding leaves invalid slots); length = slots written.
    """
    keys: list[Tensor]
    values: list[Tensor]
    valid: Tensor
    length: int = 0

    @classmethod
    def allocate(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor, dv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B,T,D] (already normed) -> k (rotated), v: [B,Hkv,T,Dh]; dv [B,T,Hkv*Dh] is added to v."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x) if dv is None else self.v_proj(x) + dv
        return apply_rope(k, cos, sin), v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)

    def project_q(self, x: Tensor, cos: Tensor, sin: Tensor, dq: Tensor | None = None) -> Tensor:
        """x [B,T,D] -> q (rotated) [B,H,T,Dh]; dq [B,T,H*Dh] is added before the rotation."""
        b, t, _ = x.shape
        q = self.q_proj(x) if dq is None else self.q_proj(x) + dq
        return apply_rope(q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, layer: int, delta: tuple[Tensor, Tensor] | None = None,
                prefix: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """prefix: keys, values [B,Hkv,P,Dh] before the layer's own, and the whole mask [B,1,T,P+S]
        (AttentionPrefix.mask)."""
        b, t, _ = x.shape
        dq, dv = delta if delta is not None else (None, None)
        q = self.project_q(x, cos, sin, dq)
        k, v = self.project_kv(x, cos, sin, dv)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start:start + t] = k
            cache.values[layer][:, :, start:start + t] = v
            k = cache.keys[layer][:, :, :start + t]
            v = cache.values[layer][:, :, :start + t]
        if prefix is not None:
            pk, pv, mask = prefix
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        out = attend(q, k, v, mask, causal=True)  # [B,H,T,Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(self.inv_freq, positions, self.dtype)

    def hidden_states(self, input_ids: Tensor, positions: Tensor, token_valid: Tensor | None = None,
                      cache: KVCache | None = None, layer_hook: LayerHook | None = None,
                      n_layers: int | None = None, attn_delta: AttentionDelta | None = None,
                      attn_prefix: AttentionPrefix | None = None) -> Tensor:
        """Run the stack; returns h [B,T,D] before the final norm.

        input_ids, positions: [B,T]; token_valid [B,T] bool (False on left padding).
        With a cache the new tokens are appended at slot `cache.length`, which then
        advances by T. n_layers stops early (the query vector only needs layer 0).
        """
        b, t = input_ids.shape
        cos, sin = self.rope(positions)
        mask = self._mask(b, t, token_valid, cache, input_ids.device)
        prefix_mask = None if attn_prefix is None else \
            attn_prefix.mask(mask, b, t, t + (cache.length if cache is not None else 0))  # once, not per layer
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers[:n_layers]):
            x = layer.input_layernorm(h)
            prefix = None
            if attn_prefix is not None and attn_prefix.first <= i < attn_prefix.first + attn_prefix.keys.shape[0]:
                j = i - attn_prefix.first
                prefix = (attn_prefix.keys[j], attn_prefix.values[j], prefix_mask)
            h = h + layer.self_attn(x, cos, sin, mask, cache, i, None if attn_delta is None else attn_delta(i, x),
                                    prefix)
            if layer_hook is not None:
                h = layer_hook(i, h)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if cache is not None:
            cache.length += t
        return h

    def forward(self, input_ids: Tensor, positions: Tensor, token_valid: Tensor | None = None,
                cache: KVCache | None = None, layer_hook: LayerHook | None = None,
                last_only: bool = False) -> Tensor:
        """Logits [B,T,V] (or [B,1,V] with last_only) in fp32."""
        h = self.hidden_states(input_ids, positions, token_valid, cache, layer_hook)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h)).float()

    @staticmethod
    def _mask(b: int, t: int, token_valid: Tensor | None, cache: KVCache | None,
              device: torch.device) -> Tensor | None:
        """Boolean attention mask [B,1,T,S], or None when plain causal attention is exact."""
        if cache is None and token_valid is None:
            return None
        start = cache.length if cache is not None else 0
        if cache is not None:
            if start + t > cache.capacity:
                raise ValueError(f"KV cache overflow: {start + t} tokens > capacity {cache.capacity}")
            all_valid = token_valid is None or bool(token_valid.all())
            if token_valid is None:
                token_valid = torch.ones(b, t, dtype=torch.bool, device=device)
            cache.valid[:, start:start + t] = token_valid
            if start == 0 and all_valid:
                return None  # unpadded prefill: plain causal attention (SDPA's fast path) is exact
            key_valid = cache.valid[:, :start + t]
        else:
            if start == 0 and bool(token_valid.all()):
                return None
            key_valid = token_valid
        s = start + t
        query_pos = torch.arange(start, s, device=device)
        key_pos = torch.arange(s, device=device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [T,S]
        mask = causal[None] & key_valid[:, None, :]  # [B,T,S]
        # A padding query may see only itself: keeps its row finite (see attend()).
        mask = mask | (key_pos[None, None, :] == query_pos[None, :, None])
        return mask[:, None]

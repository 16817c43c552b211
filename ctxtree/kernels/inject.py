"""The injection decoder ("upper model", method.md §5).

The base Llama with a cross-attention block in layers 0..M-1, between
self-attention and the MLP, attending (non-causally) over the K/V of the tree
nodes selected for the request. New parameters per injection layer: q_proj,
o_proj, cross_norm; q_proj and cross_norm start as copies of the layer's
self-attention q_proj and input norm, o_proj starts at zero, so an untrained
decoder is exactly the base model.

Chunk-level RoPE (query at position n = number of chunks, keys of chunk r at
position r) is folded into the keys once per request: rotating chunk r's keys by
r - n is exact because rotations compose, and nothing changes per decode step.
When search leaves chunks out (top_chunks), the injected ones are numbered 0..n-1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ctxtree.kernels.llama import KVCache, Llama, RMSNorm, apply_rope, attend, rope_cos_sin
from ctxtree.kernels.tree import ContextTree, gather_nodes

CROSS_ROPE = ("chunk", "none")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


class AdapterError(ValueError):
    """Injection weights that do not belong to this base model or are malformed."""


class CrossAttention(nn.Module):
    def __init__(self, base: Llama, layer: int):
        super().__init__()
        cfg = base.cfg
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.cross_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        src = base.layers[layer]
        with torch.no_grad():
            self.q_proj.weight.copy_(src.self_attn.q_proj.weight)
            if cfg.qkv_bias:
                self.q_proj.bias.copy_(src.self_attn.q_proj.bias)
            self.cross_norm.weight.copy_(src.input_layernorm.weight)
            self.o_proj.weight.zero_()
            if cfg.o_bias:
                self.o_proj.bias.zero_()
        self.to(device=base.device, dtype=base.dtype)

    def forward(self, h: Tensor, keys: Tensor, values: Tensor, valid: Tensor) -> Tensor:
        """h [B,T,D]; keys/values [B,Hkv,S,Dh]; valid [B,S] -> [B,T,D]."""
        b, t, _ = h.shape
        q = self.q_proj(self.cross_norm(h)).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        has_context = valid.any(dim=1)  # [B]
        # A request with no context would give an all-masked row (NaN); let it attend to
        # its (zero) padding instead and zero the result below.
        mask = (valid | ~has_context[:, None])[:, None, None, :]  # [B,1,1,S]
        out = attend(q, keys, values, mask)  # [B,H,T,Dh]
        out = out * has_context[:, None, None, None].to(out.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


@dataclass
class InjectedContext:
    """The K/V injected into a batch: keys/values [M, B, Hkv, S, Dh] (chunk RoPE folded in),
    valid [B, S] (False on padding, for requests with less context than the longest)."""
    keys: Tensor
    values: Tensor
    valid: Tensor

    @property
    def batch(self) -> int:
        return self.valid.shape[0]


class InjectionDecoder(nn.Module):
    def __init__(self, base: Llama, n_layers: int, cross_rope: str = "chunk", top_chunks: int = 0):
        super().__init__()
        if not 1 <= n_layers <= base.cfg.num_hidden_layers:
            raise ValueError(f"n_layers (M) must be in 1..{base.cfg.num_hidden_layers}, got {n_layers}")
        if cross_rope not in CROSS_ROPE:
            raise ValueError(f"cross_rope {cross_rope!r} unknown; expected one of {CROSS_ROPE}")
        self.base = base
        self.n_layers = n_layers
        self.cross_rope = cross_rope
        if top_chunks < 0:
            raise ValueError(f"top_chunks must be >= 0 (0: every chunk), got {top_chunks}")
        # chunks search keeps per request (ctxtree.kernels.tree.search_documents): a property of
        # the trained weights, which learnt to read that many; 0 = every chunk
        self.top_chunks = top_chunks
        self.cross_attn = nn.ModuleList(CrossAttention(base, i) for i in range(n_layers))

    def adapter_state(self) -> dict[str, Tensor]:
        return {f"cross_attn.{k}": v for k, v in self.cross_attn.state_dict().items()}

    def forward(self, input_ids: Tensor, positions: Tensor, token_valid: Tensor | None = None,
                cache: KVCache | None = None, context: InjectedContext | None = None,
                last_only: bool = False) -> Tensor:
        """Logits [B,T,V] (fp32). Without context this is exactly the base model."""
        if context is None:
            return self.base(input_ids, positions, token_valid, cache, last_only=last_only)
        if context.batch != input_ids.shape[0]:
            raise ValueError(f"context batch {context.batch} != input batch {input_ids.shape[0]}")

        def inject(i: int, h: Tensor) -> Tensor:
            if i >= self.n_layers:
                return h
            return h + self.cross_attn[i](h, context.keys[i], context.values[i], context.valid)

        return self.base(input_ids, positions, token_valid, cache, layer_hook=inject, last_only=last_only)

    # ---- building the injected K/V ----------------------------------------------------

    def request_kv(self, trees: list[ContextTree], selections: list[Tensor]) -> tuple[Tensor, Tensor]:
        """K/V [M, Hkv, S, Dh] of one request: the selected nodes of every tree (documents
        in request order), in the decoder's dtype, chunk RoPE folded into the keys."""
        if len(trees) != len(selections):
            raise ValueError(f"{len(trees)} trees but {len(selections)} selections")
        if not trees:
            cfg = self.base.cfg
            empty = torch.zeros(self.n_layers, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=self.base.dtype,
                                device=self.base.device)
            return empty, empty.clone()
        keys, values, chunks, offset = [], [], [], 0
        for tree, selected in zip(trees, selections):
            if tree.config.n_layers < self.n_layers:
                raise ValueError(f"tree has K/V for {tree.config.n_layers} layers, decoder needs {self.n_layers}")
            k, v, chunk_index = gather_nodes(tree, selected.cpu())
            keys.append(k[: self.n_layers])
            values.append(v[: self.n_layers])
            chunks.append(chunk_index + offset)
            offset += tree.n_chunks
        device = self.base.device
        k = torch.cat(keys, dim=2).to(device, torch.float32)  # [M,Hkv,S,Dh]
        v = torch.cat(values, dim=2).to(device)
        if self.cross_rope == "chunk":
            # the injected chunks are numbered 0..n-1 in document order (chunks left out by
            # search_documents leave no gap); keys of chunk r move to r - n: the query's
            # rotation to position n is folded in.
            chunk_ids = torch.cat(chunks)  # [S]
            injected = torch.unique(chunk_ids)  # sorted
            rel = (torch.searchsorted(injected, chunk_ids) - injected.numel())[None].to(device)  # [1,S]
            cos, sin = rope_cos_sin(self.base.inv_freq, rel, torch.float32)  # fp32 angles even for bf16 models
            k = apply_rope(k, cos, sin)
        return k.to(self.base.dtype), v.to(self.base.dtype)


def batch_context(per_request: list[tuple[Tensor, Tensor]]) -> InjectedContext:
    """Pad each request's K/V [M,Hkv,S_b,Dh] to the longest S and stack along a batch axis."""
    s_max = max(k.shape[2] for k, _ in per_request)
    m, hkv, _, dh = per_request[0][0].shape
    dtype, device = per_request[0][0].dtype, per_request[0][0].device
    b = len(per_request)
    keys = torch.zeros(m, b, hkv, s_max, dh, dtype=dtype, device=device)
    values = torch.zeros(m, b, hkv, s_max, dh, dtype=dtype, device=device)
    valid = torch.zeros(b, s_max, dtype=torch.bool, device=device)
    for row, (k, v) in enumerate(per_request):
        s = k.shape[2]
        keys[:, row, :, :s] = k
        values[:, row, :, :s] = v
        valid[row, :s] = True
    return InjectedContext(keys=keys, values=values, valid=valid)


# ---- adapter files --------------------------------------------------------------------

def save_adapter(decoder: InjectionDecoder, out_dir: Path, base_digest: str, extra: dict | None = None) -> None:
    """adapter.safetensors (the cross-attention weights) + adapter.json (config, base digest)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in decoder.adapter_state().items()}
    save_file(state, str(out_dir / ADAPTER_WEIGHTS))
    meta = {"n_layers": decoder.n_layers, "cross_rope": decoder.cross_rope, "top_chunks": decoder.top_chunks,
            "base_weights_digest": base_digest, **(extra or {})}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_adapter(base: Llama, adapter_dir: Path, base_digest: str,
                 cross_rope: str | None = None, top_chunks: int | None = None) -> InjectionDecoder:
    """An InjectionDecoder over `base` with trained weights; refuses another base model's adapter.
    cross_rope and top_chunks override what the adapter was trained with (experiments)."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("base_weights_digest") != base_digest:
        raise AdapterError(f"adapter {adapter_dir} was trained for base weights {meta.get('base_weights_digest')!r}, "
                           f"but the loaded model is {base_digest!r}")
    decoder = InjectionDecoder(base, int(meta["n_layers"]), cross_rope or meta.get("cross_rope", "chunk"),
                               int(meta.get("top_chunks", 0)) if top_chunks is None else top_chunks)
    state = {k.removeprefix("cross_attn."): v.to(base.device) for k, v in load_file(str(weights_path)).items()}
    try:
        decoder.cross_attn.load_state_dict({k: v.to(base.dtype) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"adapter weights in {weights_path} do not fit this model: {e}") from e
    return decoder.eval()

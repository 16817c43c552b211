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

Copy head (optional, a deviation from the method; docs/quality.md "Copy head"): a
pointer over the injected positions, whose document tokens are known (trees store
them), mixed with the LM head as in pointer-generator networks:
p(w) = (1 - g) p_LM(w) + g sum_{j: token_j = w} a_j, with a = softmax over the injected
positions of q(h) . k(V_j) and g = sigmoid(gate(h)), h the final normed state. The
injection layers put what the document says into the residual stream, but a
4-layer cross-attention cannot carry *which* of 49,152 tokens an unseen word is up to
the LM head (a 2.7M-parameter adapter learnt digits, never words); a pointer emits the
token it points at exactly.

Upper-layer adapters (optional, `upper_rank` > 0; method.md §6 allows training the top
layers): low-rank deltas on the query and value projections of layers M..N-1, which read
nothing of the context themselves but learn to use what the injection layers wrote into
the residual stream (docs/quality.md "Depth": untrained, bottom-layer injection derails
the frozen upper layers). They start at zero (the decoder is then exactly what it was
without them), and never touch layers 0..M-1, so the compressor, the trees and their
fingerprint are those of the base model.

Reading layers (optional, `reading_from` = J, a deviation from the method; kernels/reading.py,
docs/quality.md "Reading layers"): the text of the chunks the search keeps, encoded by the
whole base model from the tokens the trees store, joins the self-attention of layers J..N-1
in one softmax with the question's own keys, exactly as a prompt prefix would. No
parameters: with an untrained cross-attention and J = 0 the decoder is the base model with
those chunks' text before the prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ctxtree.kernels.llama import AttentionPrefix, KVCache, Llama, RMSNorm, apply_rope, attend, rope_cos_sin
from ctxtree.kernels.reading import reading_kv
from ctxtree.kernels.tree import ContextTree, gather_nodes

CROSS_ROPE = ("chunk", "none")
READ_AS_TRAINED = "as-trained"  # load_adapter's reading_from: the adapter's own setting
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


class UpperAdapters(nn.Module):
    """Low-rank deltas on q_proj and v_proj of layers first..N-1 (module docstring):
    dq = (x A_q) B_q, dv = (x A_v) B_v, x the layer's normed input; B starts at zero."""

    def __init__(self, base: Llama, first: int, rank: int):
        super().__init__()
        cfg = base.cfg
        if rank < 1 or first >= cfg.num_hidden_layers:
            raise ValueError(f"upper adapters need rank >= 1 and a layer above the injection layers "
                             f"(rank {rank}, first layer {first} of {cfg.num_hidden_layers})")
        n, d = cfg.num_hidden_layers - first, cfg.hidden_size
        self.first, self.rank = first, rank
        self.q_down = nn.Parameter(torch.randn(n, d, rank) / math.sqrt(d))
        self.q_up = nn.Parameter(torch.zeros(n, rank, cfg.num_attention_heads * cfg.head_dim))
        self.v_down = nn.Parameter(torch.randn(n, d, rank) / math.sqrt(d))
        self.v_up = nn.Parameter(torch.zeros(n, rank, cfg.num_key_value_heads * cfg.head_dim))
        self.to(device=base.device, dtype=base.dtype)

    def forward(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """x [B,T,D] (layer's normed input) -> (dq [B,T,H*Dh], dv [B,T,Hkv*Dh]), None below `first`."""
        if layer < self.first:
            return None
        j = layer - self.first
        return (x @ self.q_down[j]) @ self.q_up[j], (x @ self.v_down[j]) @ self.v_up[j]


COPY_RANK = 128        # query/key width of the copy head's pointer
COPY_GATE_INIT = -2.0  # gate bias at initialisation: the copy head starts with 12% of the mass


@dataclass
class RequestKV:
    """The injected positions of one request: keys/values [M, Hkv, S, Dh] (chunk RoPE folded
    into the keys), token_ids [S] (the document token at each position); with reading layers
    reading_keys/reading_values [N-J, Hkv, P, Dh] (kernels/reading.py)."""
    keys: Tensor
    values: Tensor
    token_ids: Tensor
    reading_keys: Tensor | None = None
    reading_values: Tensor | None = None


@dataclass
class InjectedContext:
    """The K/V injected into a batch: keys/values [M, B, Hkv, S, Dh] (chunk RoPE folded in),
    valid [B, S] (False on padding, for requests with less context than the longest),
    token_ids [B, S] (0 on padding). copy_keys [B, S, r]: the copy head's keys, computed
    once per request on first use (they depend only on the values). With reading layers:
    reading_keys/reading_values [N-J, B, Hkv, P, Dh], reading_valid [B, P]."""
    keys: Tensor
    values: Tensor
    valid: Tensor
    token_ids: Tensor
    copy_keys: Tensor | None = None
    reading_keys: Tensor | None = None
    reading_values: Tensor | None = None
    reading_valid: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.valid.shape[0]


class CopyHead(nn.Module):
    """A pointer over the injected positions, mixed with the LM head (module docstring).

    Its keys are the injected values of every injection layer (no RoPE in V: a token's
    key does not depend on where it sits in its node), each layer scaled to unit RMS, of
    the position and of the one before it."""

    def __init__(self, base: Llama, n_layers: int, rank: int = COPY_RANK):
        super().__init__()
        cfg = base.cfg
        self.rank = rank
        self.query = nn.Linear(cfg.hidden_size, rank, bias=False)
        feats = n_layers * cfg.num_key_value_heads * cfg.head_dim
        self.key = nn.Linear(feats, rank, bias=False)
        # the previous injected position's values: "the token after the one just emitted" is
        # then one bilinear match (a multi-token word, a value's next digit)
        self.key_prev = nn.Linear(feats, rank, bias=False)
        self.gate = nn.Linear(cfg.hidden_size, 1)
        with torch.no_grad():
            self.key_prev.weight.zero_()
            self.gate.weight.zero_()
            self.gate.bias.fill_(COPY_GATE_INIT)
        self.to(device=base.device, dtype=base.dtype)

    def keys_of(self, values: Tensor) -> Tensor:
        """values [M,B,Hkv,S,Dh] -> copy keys [B,S,r]."""
        m, b, hkv, s, dh = values.shape
        feats = values.permute(1, 3, 0, 2, 4).reshape(b, s, m, hkv * dh).float()
        feats = feats * torch.rsqrt(feats.pow(2).mean(-1, keepdim=True) + 1e-6)
        feats = feats.reshape(b, s, m * hkv * dh).to(self.key.weight.dtype)
        # positions are in node order: a node's first position is given the last position of
        # the node before it as its neighbour, which training learns to discount
        prev = torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], dim=1)
        return self.key(feats) + self.key_prev(prev)

    def forward(self, hn: Tensor, lm_logits: Tensor, context: InjectedContext) -> Tensor:
        """hn [B,T,D] (final-normed states), lm_logits [B,T,V] -> log-probabilities [B,T,V] (fp32)
        of the mixture; they sum to 1, so softmax/argmax/cross-entropy treat them as logits."""
        if context.copy_keys is None:
            context.copy_keys = self.keys_of(context.values)
        b, t, _ = hn.shape
        q = self.query(hn)  # [B,T,r]
        scores = (q @ context.copy_keys.transpose(1, 2)).float() / math.sqrt(self.rank)  # [B,T,S]
        has_context = context.valid.any(dim=1)  # [B]
        scores = scores.masked_fill(~(context.valid | ~has_context[:, None])[:, None, :], float("-inf"))
        pointer = torch.softmax(scores, dim=-1)  # [B,T,S]
        copy = torch.zeros_like(lm_logits).scatter_add_(
            2, context.token_ids[:, None, :].expand(b, t, -1), pointer)  # [B,T,V]
        gate = torch.sigmoid(self.gate(hn).float()) * has_context[:, None, None]  # [B,T,1]
        # clamped logs: log(0) would give NaN gradients through logaddexp
        return torch.logaddexp(torch.log1p(-gate) + torch.log_softmax(lm_logits, dim=-1),
                               torch.log(gate.clamp_min(1e-30)) + torch.log(copy.clamp_min(1e-30)))


class InjectionDecoder(nn.Module):
    def __init__(self, base: Llama, n_layers: int, cross_rope: str = "chunk", top_chunks: int = 0,
                 copy_head: bool = False, upper_rank: int = 0, reading_from: int | None = None):
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
        self.copy_head = CopyHead(base, n_layers) if copy_head else None
        self.upper = UpperAdapters(base, n_layers, upper_rank) if upper_rank else None
        self.reading_from: int | None = None
        self.set_reading(reading_from)

    def set_reading(self, first: int | None) -> None:
        """Reading layers first..N-1 (kernels/reading.py), or None: none (the method)."""
        n = self.base.cfg.num_hidden_layers
        if first is not None and (not isinstance(first, int) or isinstance(first, bool) or not 0 <= first < n):
            raise ValueError(f"the first reading layer must be in 0..{n - 1} (or none), got {first}")
        self.reading_from = first

    def adapter_modules(self) -> dict[str, nn.Module]:
        """The trained modules, by the name their weights carry in adapter.safetensors."""
        mods: dict[str, nn.Module] = {"cross_attn": self.cross_attn}
        if self.copy_head is not None:
            mods["copy_head"] = self.copy_head
        if self.upper is not None:
            mods["upper"] = self.upper
        return mods

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.{k}", p) for name, mod in self.adapter_modules().items() for k, p in mod.named_parameters()]

    def adapter_state(self) -> dict[str, Tensor]:
        return {f"{name}.{k}": v for name, mod in self.adapter_modules().items() for k, v in mod.state_dict().items()}

    def add_copy_head(self) -> None:
        """Give an adapter trained without one a fresh copy head (training)."""
        if self.copy_head is None:
            self.copy_head = CopyHead(self.base, self.n_layers)

    def add_upper(self, rank: int) -> None:
        """Give an adapter trained without them fresh upper-layer adapters (training)."""
        if self.upper is None:
            self.upper = UpperAdapters(self.base, self.n_layers, rank)
        elif self.upper.rank != rank:
            raise ValueError(f"the adapter's upper layers have rank {self.upper.rank}, not {rank}")

    def hidden_states(self, input_ids: Tensor, positions: Tensor, token_valid: Tensor | None,
                      cache: KVCache | None, context: InjectedContext) -> Tensor:
        """h [B,T,D] before the final norm, the context injected in layers 0..M-1."""
        if context.batch != input_ids.shape[0]:
            raise ValueError(f"context batch {context.batch} != input batch {input_ids.shape[0]}")

        def inject(i: int, h: Tensor) -> Tensor:
            if i >= self.n_layers:
                return h
            return h + self.cross_attn[i](h, context.keys[i], context.values[i], context.valid)

        upper = None
        if self.upper is not None:
            # a request without context is answered by the base model, as without upper adapters
            has_context = context.valid.any(dim=1)[:, None, None]  # [B,1,1]

            def upper(i: int, x: Tensor) -> tuple[Tensor, Tensor] | None:
                delta = self.upper(i, x)
                if delta is None:
                    return None
                on = has_context.to(x.dtype)
                return delta[0] * on, delta[1] * on

        prefix = None
        if self.reading_from is not None:
            if context.reading_keys is None:
                raise ValueError("this decoder has reading layers but the context has no reading K/V "
                                 "(build it with this decoder's request_kv)")
            n_read = context.reading_keys.shape[0]
            if n_read != self.base.cfg.num_hidden_layers - self.reading_from:
                raise ValueError(f"the context's reading K/V cover {n_read} layers; this decoder reads from "
                                 f"layer {self.reading_from} (build the context with this decoder's request_kv)")
            prefix = AttentionPrefix(context.reading_keys, context.reading_values, context.reading_valid,
                                     self.reading_from)

        return self.base.hidden_states(input_ids, positions, token_valid, cache, layer_hook=inject,
                                       attn_delta=upper, attn_prefix=prefix)

    def logits(self, h: Tensor, context: InjectedContext) -> Tensor:
        """h [B,T,D] (hidden_states, any subset of positions per row) -> [B,T,V] fp32: the LM
        head's logits, or with a copy head the mixture's log-probabilities."""
        hn = self.base.norm(h)
        lm = self.base.lm_head(hn).float()
        return lm if self.copy_head is None else self.copy_head(hn, lm, context)

    def forward(self, input_ids: Tensor, positions: Tensor, token_valid: Tensor | None = None,
                cache: KVCache | None = None, context: InjectedContext | None = None,
                last_only: bool = False) -> Tensor:
        """Logits [B,T,V] (fp32). Without context this is exactly the base model."""
        if context is None:
            return self.base(input_ids, positions, token_valid, cache, last_only=last_only)
        h = self.hidden_states(input_ids, positions, token_valid, cache, context)
        return self.logits(h[:, -1:] if last_only else h, context)

    # ---- building the injected K/V ----------------------------------------------------

    def request_kv(self, trees: list[ContextTree], selections: list[Tensor]) -> RequestKV:
        """The selected nodes of every tree of one request (documents in request order):
        K/V [M, Hkv, S, Dh] in the decoder's dtype, chunk RoPE folded into the keys."""
        if len(trees) != len(selections):
            raise ValueError(f"{len(trees)} trees but {len(selections)} selections")
        device = self.base.device
        if not trees:
            cfg = self.base.cfg
            empty = torch.zeros(self.n_layers, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=self.base.dtype,
                                device=device)
            reading = None if self.reading_from is None else reading_kv(self.base, [], [], self.reading_from)
            return RequestKV(empty, empty.clone(), torch.zeros(0, dtype=torch.long, device=device),
                             *(reading or (None, None)))
        keys, values, chunks, tokens, offset = [], [], [], [], 0
        for tree, selected in zip(trees, selections):
            if tree.config.n_layers < self.n_layers:
                raise ValueError(f"tree has K/V for {tree.config.n_layers} layers, decoder needs {self.n_layers}")
            g = gather_nodes(tree, selected.cpu())
            keys.append(g.keys[: self.n_layers])
            values.append(g.values[: self.n_layers])
            chunks.append(g.chunk_index + offset)
            tokens.append(g.token_ids)
            offset += tree.n_chunks
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
        reading = None if self.reading_from is None else reading_kv(self.base, trees, selections, self.reading_from)
        return RequestKV(k.to(self.base.dtype), v.to(self.base.dtype), torch.cat(tokens).to(device),
                         *(reading or (None, None)))


def extend_injection(decoder: InjectionDecoder, n_layers: int) -> InjectionDecoder:
    """The same adapter injecting into more layers: layers 0..decoder.n_layers-1 keep their
    weights, the new ones start as the method initialises them (o_proj 0), so the result
    computes exactly what `decoder` does until they learn (training a deeper adapter from a
    shallower one's skills; docs/quality.md "Depth")."""
    if n_layers < decoder.n_layers:
        raise ValueError(f"cannot extend a {decoder.n_layers}-layer adapter to {n_layers} layers "
                         f"(train with --layers >= {decoder.n_layers})")
    if decoder.copy_head is not None and n_layers != decoder.n_layers:
        raise ValueError("a copy head's keys span every injection layer: an adapter with one cannot be extended")
    if decoder.upper is not None and n_layers != decoder.n_layers:
        raise ValueError("upper-layer adapters start above the injection layers: an adapter with them "
                         "cannot be extended")
    deeper = InjectionDecoder(decoder.base, n_layers, decoder.cross_rope, decoder.top_chunks,
                              reading_from=decoder.reading_from)
    for old, new in zip(decoder.cross_attn, deeper.cross_attn):
        new.load_state_dict(old.state_dict())
    deeper.copy_head, deeper.upper = decoder.copy_head, decoder.upper
    return deeper.train(decoder.training)


def pad_and_stack(kv: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Per request keys and values [L,Hkv,S_b,Dh] -> padded to the longest S and stacked:
    keys, values [L,B,Hkv,S,Dh] and valid [B,S] (False on the padding)."""
    s_max = max(k.shape[2] for k, _ in kv)
    layers, hkv, _, dh = kv[0][0].shape
    k0 = kv[0][0]
    keys = torch.zeros(layers, len(kv), hkv, s_max, dh, dtype=k0.dtype, device=k0.device)
    values = torch.zeros_like(keys)
    valid = torch.zeros(len(kv), s_max, dtype=torch.bool, device=k0.device)
    for row, (k, v) in enumerate(kv):
        keys[:, row, :, :k.shape[2]] = k
        values[:, row, :, :k.shape[2]] = v
        valid[row, :k.shape[2]] = True
    return keys, values, valid


def batch_context(per_request: list[RequestKV]) -> InjectedContext:
    """Pad each request's K/V [M,Hkv,S_b,Dh] (and reading K/V) to the longest and stack along a batch axis."""
    keys, values, valid = pad_and_stack([(r.keys, r.values) for r in per_request])
    token_ids = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    for row, r in enumerate(per_request):
        token_ids[row, :r.token_ids.shape[0]] = r.token_ids
    context = InjectedContext(keys=keys, values=values, valid=valid, token_ids=token_ids)
    if len({r.reading_keys is None for r in per_request}) > 1:
        raise ValueError("requests of one batch must all have reading K/V or none")
    if per_request[0].reading_keys is not None:
        context.reading_keys, context.reading_values, context.reading_valid = pad_and_stack(
            [(r.reading_keys, r.reading_values) for r in per_request])
    return context


# ---- adapter files --------------------------------------------------------------------

def save_adapter(decoder: InjectionDecoder, out_dir: Path, base_digest: str, extra: dict | None = None) -> None:
    """adapter.safetensors (the cross-attention weights) + adapter.json (config, base digest)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in decoder.adapter_state().items()}
    save_file(state, str(out_dir / ADAPTER_WEIGHTS))
    meta = {"n_layers": decoder.n_layers, "cross_rope": decoder.cross_rope, "top_chunks": decoder.top_chunks,
            "copy_head": decoder.copy_head is not None,
            "upper_rank": 0 if decoder.upper is None else decoder.upper.rank,
            "reading_from": decoder.reading_from,
            "base_weights_digest": base_digest, **(extra or {})}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_adapter(base: Llama, adapter_dir: Path, base_digest: str,
                 cross_rope: str | None = None, top_chunks: int | None = None,
                 reading_from: int | None | str = READ_AS_TRAINED) -> InjectionDecoder:
    """An InjectionDecoder over `base` with trained weights; refuses another base model's adapter.
    cross_rope, top_chunks and reading_from override what the adapter was trained with."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("base_weights_digest") != base_digest:
        raise AdapterError(f"adapter {adapter_dir} was trained for base weights {meta.get('base_weights_digest')!r}, "
                           f"but the loaded model is {base_digest!r}")
    decoder = InjectionDecoder(base, int(meta["n_layers"]), cross_rope or meta.get("cross_rope", "chunk"),
                               int(meta.get("top_chunks", 0)) if top_chunks is None else top_chunks,
                               copy_head=bool(meta.get("copy_head", False)),
                               upper_rank=int(meta.get("upper_rank", 0)),
                               reading_from=meta.get("reading_from") if reading_from == READ_AS_TRAINED else reading_from)
    state = load_file(str(weights_path))
    modules = decoder.adapter_modules()
    unknown = sorted({k.split(".", 1)[0] for k in state} - set(modules))
    if unknown:
        raise AdapterError(f"adapter weights in {weights_path} hold modules this adapter.json does not declare: {unknown}")
    try:
        for name, mod in modules.items():
            mod.load_state_dict({k.removeprefix(name + "."): v.to(base.device, base.dtype)
                                 for k, v in state.items() if k.startswith(name + ".")}, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"adapter weights in {weights_path} do not fit this model: {e}") from e
    return decoder.eval()

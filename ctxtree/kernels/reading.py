"""Reading layers: the selected nodes, re-encoded by the whole base model, join the
self-attention of the decoder's layers `first`..N-1 (a deviation from the method;
docs/quality.md "Reading layers").

Why: the tree's stored K/V are those of the bottom M layers only, and the frozen upper
layers never see the document. Measured on the untrained base model (docs/quality.md
"Depth"), the selected nodes given to every layer's self-attention recover more than half
of what the text itself tells the model about a passage, while given to the bottom 4-16
layers only they make answers worse than no text. So the search keeps choosing nodes from
the stored tree (routing vectors, M-layer K/V for the cross-attention), and the chunks it
keeps are read at full depth.

What is computed, per request: every node the search selected in every injected chunk is
encoded alone by the base model (positions from 0, as the compressor encodes it), its kept
positions are taken (the same positions the tree keeps), and their keys are moved to the
place the position would have if the injected chunks were one text standing right before
the question: chunk r of the injection (documents in request order, chunks in document
order) starts after the injected chunks before it, and the last position sits at -1, so
the question's own positions (0..T-1) need no change. Cost: the base model's forward pass
over the injected chunks' tokens (every token of an injected chunk is in one of its h+1
selected nodes), paid once per request, from the tokens the tree stores: trees,
fingerprints and the store are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ctxtree.kernels.compressor import compress_nodes
from ctxtree.kernels.llama import Llama, apply_rope, rope_cos_sin
from ctxtree.kernels.tree import ContextTree, injected_chunks, keep_per_node, kept_positions, node_spans


@torch.no_grad()
def reading_kv(model: Llama, trees: list[ContextTree], selections: list[Tensor], first: int) -> tuple[Tensor, Tensor]:
    """Keys and values [N-first, Hkv, P, Dh] (model dtype, model device) of the selected nodes'
    kept positions in layers first..N-1, keys rotated to positions -S..-1 of the injected
    chunks laid end to end (S tokens in all); P = 0 without any."""
    cfg = model.cfg
    n = cfg.num_hidden_layers
    if not 0 <= first < n:
        raise ValueError(f"the first reading layer must be in 0..{n - 1}, got {first}")
    pieces: list[Tensor] = []
    kept: list[list[int]] = []
    places: list[int] = []  # token offset of each piece's first token in the end-to-end text
    offset = 0
    for tree, selected in zip(trees, selections):
        starts = [0]
        for length in tree.chunk_lengths:
            starts.append(starts[-1] + length)
        for c in injected_chunks(selected.cpu()).tolist():
            length = tree.chunk_lengths[c]
            spans = node_spans(length, tree.config.height)
            keep = keep_per_node(length, tree.config)
            chunk_tokens = tree.tokens[starts[c]:starts[c + 1]].long()
            for node in selected[c].tolist():
                s, e = spans[node]
                if e == s:
                    continue  # an empty node of a very short last chunk: no token, no position
                pieces.append(chunk_tokens[s:e])
                kept.append(kept_positions(e - s, keep))
                places.append(offset + s)
            offset += length
    if offset > cfg.max_position_embeddings:
        raise ValueError(f"reading layers would read {offset} tokens of injected chunks, more than the model's "
                         f"window ({cfg.max_position_embeddings}); inject fewer chunks (top_chunks, policy query)")
    empty = torch.zeros(n - first, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=model.dtype, device=model.device)
    if not pieces:
        return empty, empty.clone()
    states = compress_nodes(model, pieces, n)  # per layer [Np, Hkv, Tmax, Dh]
    rows = torch.cat([torch.full((len(k),), j) for j, k in enumerate(kept)]).to(model.device)  # [P]
    cols = torch.cat([torch.tensor(k) for k in kept]).to(model.device)  # [P] place within its piece
    # the intra-piece rotation (0..len-1) is in the keys already: add the piece's place - S
    shift = torch.cat([torch.full((len(k),), p - offset) for p, k in zip(places, kept)]).to(model.device)
    cos, sin = rope_cos_sin(model.inv_freq, shift[None], torch.float32)  # [1,P,Dh]; fp32 angles for bf16 models
    keys = torch.stack([apply_rope(states.keys[i][rows, :, cols].transpose(0, 1)[None].float(), cos, sin)[0]
                        for i in range(first, n)]).to(model.dtype)  # [N-first,Hkv,P,Dh]
    values = torch.stack([states.values[i][rows, :, cols].transpose(0, 1) for i in range(first, n)])
    return keys, values


"""Reading layers: the text of the chunks search keeps, encoded by the whole base model,
joins the self-attention of the decoder's layers `first`..N-1 (a deviation from the
method; docs/quality.md "Reading layers").

Why: the tree's stored K/V are those of the bottom M layers only, and the frozen upper
layers never see the document. Measured on the untrained base model (docs/quality.md
"Depth"), document K/V given to every layer's self-attention recover most of what the
text itself tells the model about a passage, while given to the bottom 4-16 layers only
they make answers worse than no text. So the search keeps choosing chunks from the stored
tree (routing vectors, M-layer K/V for the cross-attention), and the chunks it keeps are
read at full depth.

What is computed, per request: the injected chunks' tokens (documents in request order,
chunks in document order), laid end to end, are run through the base model in one pass at
positions -S..-1 (S tokens in all), so the question's own positions (0..T-1) need no
change: each reading layer's K/V are exactly those the layer would hold had the text
stood right before the prompt. Every position is read. A first version read only the
positions the tree keeps of each selected node, each node encoded alone: the same pass,
but it dropped what a copy needs (4K digit lookups 7/10 against 9/10 with the whole text,
same weights; docs/quality.md). Cost: the base model's forward pass over the injected
chunks (2 x 256 tokens with `top_chunks` 2), paid once per request, from the tokens the
tree stores: trees, fingerprints and the store are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ctxtree.kernels.llama import KVCache, Llama
from ctxtree.kernels.tree import ContextTree, injected_chunks


class BeyondWindow(ValueError):
    """More injected text than the base model's window: the request cannot be read."""


def injected_text(trees: list[ContextTree], selections: list[Tensor]) -> Tensor:
    """[S] the tokens of the chunks a request injects, documents in order, chunks in order."""
    parts: list[Tensor] = []
    for tree, selected in zip(trees, selections):
        starts = [0]
        for length in tree.chunk_lengths:
            starts.append(starts[-1] + length)
        parts += [tree.tokens[starts[c]:starts[c + 1]].long() for c in injected_chunks(selected.cpu()).tolist()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def reading_kv(model: Llama, trees: list[ContextTree], selections: list[Tensor], first: int) -> tuple[Tensor, Tensor]:
    """Keys and values [N-first, Hkv, S, Dh] (model dtype, model device) of the injected
    chunks' text in layers first..N-1, at positions -S..-1; S = 0 without any."""
    cfg = model.cfg
    n = cfg.num_hidden_layers
    if not 0 <= first < n:
        raise ValueError(f"the first reading layer must be in 0..{n - 1}, got {first}")
    text = injected_text(trees, selections)  # [S]
    s = text.numel()
    if s > cfg.max_position_embeddings:
        raise BeyondWindow(f"reading layers would read {s} tokens of injected chunks, more than the model's "
                         f"window ({cfg.max_position_embeddings}); inject fewer chunks (top_chunks, policy query)")
    if s == 0:
        empty = torch.zeros(n - first, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=model.dtype, device=model.device)
        return empty, empty.clone()
    cache = KVCache.allocate(cfg, 1, s, model.dtype, model.device)
    model.hidden_states(text[None].to(model.device), torch.arange(-s, 0, device=model.device)[None], cache=cache)
    keys = torch.stack([cache.keys[i][0] for i in range(first, n)])  # [N-first,Hkv,S,Dh], rotated to -S..-1
    values = torch.stack([cache.values[i][0] for i in range(first, n)])
    return keys, values

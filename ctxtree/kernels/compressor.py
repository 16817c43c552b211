"""The compressor ("lower model", method.md §1): the base model's own bottom M layers.

For a batch of tree nodes it returns each node's self-attention K (rotated at the
node's own positions 0..len-1) and V for layers 0..M-1, and its routing vector
`norm(h0[last])`. It runs on the same `Llama` instance as the decoder, so there is
one copy of the weights in memory ("self-injection").

Nodes of different lengths are right-padded: attention is causal, so a real
position never sees the padding after it and no mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctxtree.kernels.llama import Llama, attend


@dataclass
class NodeStates:
    """Compressor output for a batch of N nodes padded to length T.

    keys/values: per layer i < M, [N, Hkv, T, Dh] (padding positions hold junk);
    routes: [N, D] routing vectors; lengths: [N] real lengths.
    """
    keys: list[Tensor]
    values: list[Tensor]
    routes: Tensor
    lengths: Tensor


@torch.no_grad()
def compress_nodes(model: Llama, nodes: list[Tensor], n_layers: int) -> NodeStates:
    """Encode each node (a 1-D LongTensor of token ids, length >= 1) independently."""
    if not 1 <= n_layers <= model.cfg.num_hidden_layers:
        raise ValueError(f"n_layers must be in 1..{model.cfg.num_hidden_layers}, got {n_layers}")
    if not nodes or any(n.numel() == 0 for n in nodes):
        raise ValueError("compress_nodes needs at least one node and no empty nodes")
    device = model.device
    lengths = torch.tensor([n.numel() for n in nodes], device=device)
    t = int(lengths.max())
    ids = torch.zeros(len(nodes), t, dtype=torch.long, device=device)
    for row, node in enumerate(nodes):
        ids[row, : node.numel()] = node.to(device)
    positions = torch.arange(t, device=device).expand(len(nodes), t)
    cos, sin = model.rope(positions)
    last = lengths - 1

    h = model.embed_tokens(ids)  # [N,T,D]
    keys: list[Tensor] = []
    values: list[Tensor] = []
    routes = None
    for i in range(n_layers):
        layer = model.layers[i]
        x = layer.input_layernorm(h)
        k, v = layer.self_attn.project_kv(x, cos, sin)  # [N,Hkv,T,Dh]
        keys.append(k)
        values.append(v)
        if i == n_layers - 1 and i > 0:
            break  # the last injection layer only contributes K/V: skip its q, attention and MLP
        q = layer.self_attn.project_q(x, cos, sin)
        a = attend(q, k, v, None, causal=True).transpose(1, 2).reshape(len(nodes), t, -1)
        h = h + layer.self_attn.o_proj(a)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if i == 0:
            routes = model.norm(h[torch.arange(len(nodes), device=device), last])  # [N,D]
    assert routes is not None
    return NodeStates(keys=keys, values=values, routes=routes, lengths=lengths)


@torch.no_grad()
def query_vector(model: Llama, input_ids: Tensor, positions: Tensor, token_valid: Tensor | None,
                 query_index: Tensor) -> Tensor:
    """Routing query `norm(h0[query_index])` of the decoder input, layer 0 only, no injection.

    input_ids/positions/token_valid: [B,T]; query_index [B] -> [B,D].
    """
    h0 = model.hidden_states(input_ids, positions, token_valid, n_layers=1)
    return model.norm(h0[torch.arange(input_ids.shape[0], device=h0.device), query_index.to(h0.device)])


def route_query(model: Llama, vector: Tensor, question_ids: list[int]) -> "RouteQuery":
    """What search needs for one question: its routing vector [D] (from query_vector) and
    its own tokens' unit embeddings [Q, D] (the question alone, not the chat template,
    whose tokens are the same for every question)."""
    from ctxtree.kernels.tree import RouteQuery  # ctxtree.kernels.tree imports this module

    if not question_ids:
        raise ValueError("the question has no tokens to search with")
    embed = model.embed_tokens.weight
    ids = torch.tensor(question_ids, dtype=torch.long, device=embed.device)
    token_vectors = torch.nn.functional.normalize(embed[ids].detach().float(), dim=-1)  # [Q,D]
    return RouteQuery(vector=vector, token_vectors=token_vectors, embed=embed)

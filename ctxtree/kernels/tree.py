"""Static context trees (method.md §2-4): chunking, node layout, kept positions,
building a document's trees with the compressor, and query-aware search.

Nodes are numbered heap-style per chunk: the root is 0 (never encoded), the
children of node i are 2i+1 (left, floor(len/2) tokens) and 2i+2 (the rest).
Stored nodes are levels 1..h, i.e. heap indices 1..2^(h+1)-2; stored node j is
heap index j+1. A chunk shorter than 2^h can have empty nodes: they keep no
positions, have a zero routing vector, and search never chooses one over a
non-empty sibling.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ctxtree.kernels.codec import CODECS, decode_kv, encode_kv
from ctxtree.kernels.compressor import compress_nodes
from ctxtree.kernels.llama import Llama

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
POLICIES = ("query", "vector", "right")


@dataclass(frozen=True)
class TreeConfig:
    """Compressor and tree settings; all of them are part of the model fingerprint."""
    n_layers: int = 4        # M: injection layers
    # L = 256 rather than the method's 1024: with p = 32 the finest nodes (32 tokens) then
    # keep every position, so the decoder can copy a value exactly; at L = 1024 they keep
    # every 4th and it cannot (docs/quality.md). ctxtree/pipelines/recipe.py trains for this.
    chunk_len: int = 256     # L: tokens per chunk
    height: int = 3          # h: tree height
    keep: int = 32           # p: kept positions per node of a full chunk
    # int8 codes + one bf16 scale per (layer, head, position): half of bf16's bytes, no
    # measured accuracy loss (kernels/codec.py, docs/quality.md "Stored K/V codecs")
    codec: str = "int8"      # stored K/V: bf16 | fp16 | fp32 | int8 | fp8
    dtype: str = "float32"   # compute dtype of the compressor

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers (M) must be >= 1, got {self.n_layers}")
        if self.height < 1:
            raise ValueError(f"height (h) must be >= 1, got {self.height}")
        if self.chunk_len < 2:
            raise ValueError(f"chunk_len (L) must be >= 2, got {self.chunk_len}")
        if self.keep < 1:
            raise ValueError(f"keep (p) must be >= 1, got {self.keep}")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} unknown; expected one of {sorted(CODECS)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; expected one of {sorted(COMPUTE_DTYPES)}")

    @property
    def n_nodes(self) -> int:
        """Stored nodes per chunk (levels 1..h)."""
        return 2 ** (self.height + 1) - 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TreeConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tree config keys: {sorted(unknown)}")
        return cls(**d)


# ---- layout -------------------------------------------------------------------------

def chunk_bounds(n_tokens: int, chunk_len: int) -> list[tuple[int, int]]:
    """Consecutive, non-overlapping [start, end) chunks covering every token."""
    return [(s, min(s + chunk_len, n_tokens)) for s in range(0, n_tokens, chunk_len)]


def node_spans(length: int, height: int) -> list[tuple[int, int]]:
    """[start, end) of every heap node 0..2^(h+1)-2 of a chunk of `length` tokens."""
    spans = [(0, length)]
    for i in range(2 ** height - 1):  # every internal node, in heap order
        start, end = spans[i]
        mid = start + (end - start) // 2
        spans += [(start, mid), (mid, end)]
    return spans


def keep_per_node(chunk_length: int, cfg: TreeConfig) -> int:
    """Kept positions per node: p for a full chunk; a short chunk keeps the same
    per-level ratio on its real length, at least one (capped later by node length)."""
    return max(1, cfg.keep * chunk_length // cfg.chunk_len)


def kept_positions(node_len: int, keep: int) -> list[int]:
    """The last token of each of k equal windows: (j+1)*len//k - 1 (all if len <= keep)."""
    k = min(keep, node_len)
    return [(j + 1) * node_len // k - 1 for j in range(k)]


# ---- the tree of one document (or a run of its chunks) ------------------------------

@dataclass
class ContextTree:
    """Stored nodes of chunks [first_chunk, first_chunk + C) of one document.

    keys/values: [M, Hkv, P, Dh] in the codec dtype, P = kept positions of all nodes,
    ordered chunk-major then stored-node order; key_scales/value_scales: [M, Hkv, P]
    bf16 for a quantized codec, else None (kernels/codec.py); routes: [C, N, D];
    node_offsets: [C*N + 1] int64, node (c, j) owns positions node_offsets[c*N+j : c*N+j+1];
    tokens: [sum(chunk_lengths)] int32, the chunks' token ids (what search matches the
    question against, see search()).
    """
    config: TreeConfig
    chunk_lengths: list[int]
    first_chunk: int
    keys: Tensor
    values: Tensor
    routes: Tensor
    node_offsets: Tensor
    tokens: Tensor
    key_scales: Tensor | None = None
    value_scales: Tensor | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_lengths)

    @property
    def n_tokens(self) -> int:
        return sum(self.chunk_lengths)

    def node_counts(self) -> Tensor:
        """Kept positions per node, [C, N]."""
        return (self.node_offsets[1:] - self.node_offsets[:-1]).view(self.n_chunks, self.config.n_nodes)

    def bytes_per_position(self) -> int:
        """Stored bytes of one kept position: its K and V codes in every layer, and their scales."""
        return sum(t[:, :, :1].numel() * t.element_size()
                   for t in (self.keys, self.values, self.key_scales, self.value_scales) if t is not None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.keys, self.values, self.routes, self.node_offsets, self.tokens,
                             self.key_scales, self.value_scales) if t is not None)


@torch.no_grad()
def build_tree(model: Llama, token_ids: Tensor, cfg: TreeConfig, first_chunk: int = 0,
               max_batch_tokens: int = 8192) -> ContextTree:
    """Compress token_ids (1-D, the tokens of chunks first_chunk.., chunk-aligned) into trees.

    Nodes are batched level by level across chunks (similar lengths, little padding),
    at most max_batch_tokens padded tokens per compressor call to bound memory.
    """
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")
    codec = CODECS[cfg.codec]
    bounds = chunk_bounds(token_ids.numel(), cfg.chunk_len)
    n_nodes = cfg.n_nodes
    # Every stored node of every chunk, in storage order: (chunk, stored index, token ids, kept).
    work: list[tuple[int, int, Tensor, list[int]]] = []
    for c, (start, end) in enumerate(bounds):
        keep = keep_per_node(end - start, cfg)
        for j, (s, e) in enumerate(node_spans(end - start, cfg.height)[1:]):
            work.append((c, j, token_ids[start + s:start + e], kept_positions(e - s, keep)))

    # (chunk, node) -> K codes, K scales, V codes, V scales ([M,Hkv,k,Dh] / [M,Hkv,k]), route
    states: dict[tuple[int, int], tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor]] = {}
    todo = sorted((w for w in work if w[2].numel() > 0), key=lambda w: -w[2].numel())
    i = 0
    while i < len(todo):
        longest = todo[i][2].numel()
        n = max(1, max_batch_tokens // longest)
        batch = todo[i:i + n]
        i += n
        out = compress_nodes(model, [w[2] for w in batch], cfg.n_layers)
        for row, (c, j, _, kept) in enumerate(batch):
            kept_t = torch.tensor(kept, device=model.device)
            # trees live on the CPU: they are serialized, stored and shipped between processes
            # encoded where they were computed (a GPU moves half the bytes), kept on the CPU
            k = encode_kv(torch.stack([k[row][:, kept_t] for k in out.keys]), codec)  # codes [M,Hkv,k,Dh], scales [M,Hkv,k]
            v = encode_kv(torch.stack([v[row][:, kept_t] for v in out.values]), codec)
            states[(c, j)] = (*(None if t is None else t.cpu() for t in (*k, *v)),
                              out.routes[row].to("cpu", codec.routes_dtype))

    cfg_model = model.cfg
    parts: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor]] = []
    routes = torch.zeros(len(bounds), n_nodes, cfg_model.hidden_size, dtype=codec.routes_dtype)
    counts = []
    for c, j, _, kept in work:
        if (c, j) in states:
            parts.append(states[(c, j)])
            routes[c, j] = states[(c, j)][4]
        counts.append(len(kept) if (c, j) in states else 0)
    offsets = torch.zeros(len(work) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    keys, key_scales, values, value_scales = (_cat_positions([p[i] for p in parts]) for i in range(4))
    return ContextTree(config=cfg, chunk_lengths=[e - s for s, e in bounds], first_chunk=first_chunk,
                       keys=keys, values=values, routes=routes, node_offsets=offsets,
                       tokens=token_ids.to("cpu", torch.int32).clone(),
                       key_scales=key_scales, value_scales=value_scales)


def _cat_positions(parts: list) -> Tensor | None:
    """Join per-node K/V codes or scales along the position axis (2); None stays None."""
    return None if parts[0] is None else torch.cat(parts, dim=2)


def concat_trees(parts: list[ContextTree]) -> ContextTree:
    """Join consecutive chunk runs of one document (e.g. its shards) into one tree."""
    if not parts:
        raise ValueError("concat_trees needs at least one part")
    expected = parts[0].first_chunk
    for p in parts:
        if p.config != parts[0].config:
            raise ValueError("cannot join trees built with different configs")
        if p.first_chunk != expected:
            raise ValueError(f"tree parts are not contiguous: expected chunk {expected}, got {p.first_chunk}")
        expected += p.n_chunks
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for p in parts:
        offsets.append(p.node_offsets[1:] + base)
        base += int(p.node_offsets[-1])
    return ContextTree(
        config=parts[0].config,
        chunk_lengths=[n for p in parts for n in p.chunk_lengths],
        first_chunk=parts[0].first_chunk,
        keys=torch.cat([p.keys for p in parts], dim=2),
        values=torch.cat([p.values for p in parts], dim=2),
        routes=torch.cat([p.routes for p in parts]),
        node_offsets=torch.cat(offsets),
        tokens=torch.cat([p.tokens for p in parts]),
        key_scales=_cat_positions([p.key_scales for p in parts]),
        value_scales=_cat_positions([p.value_scales for p in parts]),
    )


def slice_tree(tree: ContextTree, start: int, end: int, copy: bool = True) -> ContextTree:
    """Chunks [start, end) of the tree (relative indices), as its own ContextTree.
    copy=False: views of the tree's tensors (for a slice that is encoded at once)."""
    n = tree.config.n_nodes
    lo, hi = int(tree.node_offsets[start * n]), int(tree.node_offsets[end * n])

    def own(t: Tensor) -> Tensor:
        return t.clone() if copy else t

    def positions(t: Tensor | None) -> Tensor | None:
        return None if t is None else own(t[:, :, lo:hi])

    return ContextTree(
        config=tree.config, chunk_lengths=tree.chunk_lengths[start:end],
        first_chunk=tree.first_chunk + start,
        keys=positions(tree.keys), values=positions(tree.values),
        routes=own(tree.routes[start:end]),
        node_offsets=tree.node_offsets[start * n:end * n + 1] - lo,
        tokens=own(tree.tokens[sum(tree.chunk_lengths[:start]):sum(tree.chunk_lengths[:end])]),
        key_scales=positions(tree.key_scales), value_scales=positions(tree.value_scales))


# ---- search (method.md §4) ----------------------------------------------------------

@dataclass
class RouteQuery:
    """What search compares a tree's nodes with, for one question.

    vector: [D] `final_norm(h0[last])` of the question (method.md §4, policy "vector");
    token_vectors: [Q, D] the question's own tokens' embeddings, unit length (policy "query");
    embed: [V, D] the model's token embedding table, where the documents' tokens are looked up.
    """
    vector: Tensor
    token_vectors: Tensor
    embed: Tensor


def token_match_scores(tree: ContextTree, query: RouteQuery) -> Tensor:
    """[C, N] score of every stored node: for each question token, its best cosine with
    any token of the node, summed over the question's tokens (late interaction on the
    input embeddings). Empty nodes score -inf.

    Why not the method's routing vector: `final_norm(h0[last])` is mostly the node's last
    token's own embedding, so on needle questions it chooses the answer's half no better
    than a coin (docs/quality.md). Token matching needs each node's tokens, which the
    tree stores (4 bytes per token, 0.3% of it), and costs one [Q, U] product over the
    document's U distinct tokens.
    """
    embed = query.embed.detach()
    ids = tree.tokens.long()
    distinct, inverse = torch.unique(ids, return_inverse=True)
    doc_vectors = torch.nn.functional.normalize(embed[distinct.to(embed.device)].float(), dim=-1).cpu()  # [U,D]
    sims = (query.token_vectors.detach().float().cpu() @ doc_vectors.T)[:, inverse]  # [Q,T]
    h = tree.config.height
    scores = torch.full((tree.n_chunks, tree.config.n_nodes), float("-inf"))
    start = 0
    for c, length in enumerate(tree.chunk_lengths):
        spans = node_spans(length, h)
        best = {}  # heap node -> [Q] best cosine per question token; leaves first, then up
        for node in range(2 ** (h + 1) - 2, 0, -1):
            s, e = spans[node]
            if 2 * node + 1 < len(spans):
                kids = [best[k] for k in (2 * node + 1, 2 * node + 2) if k in best]
                if kids:
                    best[node] = torch.stack(kids).amax(0)
            elif e > s:
                best[node] = sims[:, start + s:start + e].amax(1)
            if node in best:
                scores[c, node - 1] = best[node].sum()
        start += length
    return scores


NOT_INJECTED = 0  # a selection row of roots: the chunk is left out (the root is never stored)


def node_scores(tree: ContextTree, query: RouteQuery, policy: str) -> Tensor | None:
    """[C, N] how well every stored node matches the question under `policy` (None for
    "right", which ignores the question)."""
    if policy not in POLICIES:
        raise ValueError(f"search policy {policy!r} unknown; expected one of {POLICIES}")
    if policy == "query":
        return token_match_scores(tree, query)
    if policy == "vector":
        scores = torch.nn.functional.cosine_similarity(
            tree.routes.float(), query.vector.detach().float().cpu().view(1, 1, -1), dim=-1)  # [C,N], trees live on the CPU
        return scores.masked_fill(tree.node_counts() == 0, float("-inf"))
    return None


def search(tree: ContextTree, query: RouteQuery, policy: str = "query", scores: Tensor | None = None) -> Tensor:
    """Heap indices [C, h+1] of the nodes to inject from each chunk.

    At levels 1..h-1 the child not chosen is injected (coarse), at level h both
    children of the chosen node (finest). Policy "query" chooses the child whose tokens
    match the question's better (token_match_scores); "vector" the child whose routing
    vector has the larger cosine with the question's (method.md §4 to the letter);
    "right" always the right child. Ties go left, like argmax. Each chunk's own
    children are compared. scores: node_scores(tree, query, policy) if already computed.
    """
    if scores is None:
        scores = node_scores(tree, query, policy)
    elif policy not in POLICIES:
        raise ValueError(f"search policy {policy!r} unknown; expected one of {POLICIES}")
    c = tree.n_chunks
    empty = tree.node_counts() == 0  # [C,N]
    rows = torch.arange(c)
    node = torch.zeros(c, dtype=torch.long)
    injected = []
    for _ in range(1, tree.config.height):
        left, right = 2 * node + 1, 2 * node + 2
        if policy == "right":
            go_left = torch.zeros(c, dtype=torch.bool)
        else:
            go_left = scores[rows, left - 1] >= scores[rows, right - 1]
        go_left = torch.where(empty[rows, right - 1], True, torch.where(empty[rows, left - 1], False, go_left))
        injected.append(torch.where(go_left, right, left))
        node = torch.where(go_left, left, right)
    injected += [2 * node + 1, 2 * node + 2]
    return torch.stack(injected, dim=1)


def chunk_scores(tree: ContextTree, scores: Tensor) -> Tensor:
    """[C] a chunk's match with the question: its best node at level 2 (a quarter chunk;
    level 1 if the tree has height 1). A whole chunk's token match rewards chunks that
    merely contain many of the question's words; a quarter has to hold them together."""
    level = min(2, tree.config.height)
    first = 2 ** level - 1  # heap index of the level's first node
    return scores[:, first - 1:2 * first].amax(dim=1)


def search_documents(trees: list[ContextTree], query: RouteQuery, policy: str = "query",
                     top_chunks: int = 0) -> list[Tensor]:
    """search() over every document of a request, injecting at most `top_chunks` chunks.

    top_chunks > 0 keeps only the chunks that match the question best, at least one per
    document (so a request may keep len(trees) chunks when that is more); the rows of the
    other chunks are NOT_INJECTED. 0 keeps every chunk (method.md §4). Policy "right"
    does not look at the question, so it keeps every chunk whatever top_chunks says.
    Why select chunks at all: the decoder reads all injected positions in one softmax,
    and on documents of many chunks the other chunks' finest nodes drown the one that
    holds the answer (docs/quality.md, "chunk selection").
    """
    if top_chunks < 0:
        raise ValueError(f"top_chunks must be >= 0 (0: every chunk), got {top_chunks}")
    node_score = [node_scores(tree, query, policy) for tree in trees]
    selections = [search(tree, query, policy, s) for tree, s in zip(trees, node_score)]
    if top_chunks == 0 or policy == "right":
        return selections
    per_doc = [chunk_scores(tree, s) for tree, s in zip(trees, node_score)]
    keep = [torch.zeros(tree.n_chunks, dtype=torch.bool) for tree in trees]
    for d, scores in enumerate(per_doc):  # every document keeps its best chunk
        keep[d][int(scores.argmax())] = True
    # then the best of the rest, over all documents; ties go to the earlier chunk
    rest = sorted(((-float(s), d, c) for d, scores in enumerate(per_doc) for c, s in enumerate(scores.tolist())
                   if not keep[d][c]))
    for _, d, c in rest[:max(0, top_chunks - len(trees))]:
        keep[d][c] = True
    return [sel.masked_fill(~k[:, None], NOT_INJECTED) for sel, k in zip(selections, keep)]


def injected_chunks(selected: Tensor) -> Tensor:
    """[C'] the chunks a selection [C, k] injects (rows other than NOT_INJECTED), in order."""
    return torch.nonzero((selected != NOT_INJECTED).any(dim=1)).flatten()


@dataclass
class Gathered:
    """The selected nodes of one tree, position by position: K, V [M, Hkv, S, Dh] (decoded:
    float32 for a quantized codec, the stored float dtype otherwise), chunk [S] (the
    position's chunk, relative to the tree) and token_ids [S] (the document token each
    kept position sits on: what the decoder's copy head emits when it points there)."""
    keys: Tensor
    values: Tensor
    chunk_index: Tensor
    token_ids: Tensor


@functools.lru_cache(maxsize=64)
def chunk_kept_offsets(length: int, cfg: TreeConfig) -> Tensor:
    """[P_c] the token offset within a chunk of `length` tokens of each of its kept positions,
    in storage order (stored nodes in heap order, then kept positions): build_tree's layout."""
    keep = keep_per_node(length, cfg)
    offsets = [s + k for s, e in node_spans(length, cfg.height)[1:] for k in kept_positions(e - s, keep)]
    return torch.tensor(offsets, dtype=torch.long)


def gather_nodes(tree: ContextTree, selected: Tensor) -> Gathered:
    """The kept positions of the selected nodes, decoded.

    selected: heap indices [C, k] as returned by search(); rows of NOT_INJECTED are skipped.
    """
    n = tree.config.n_nodes
    chunks = injected_chunks(selected)  # [C']
    selected = selected[chunks]
    flat = (chunks[:, None] * n + selected - 1).reshape(-1)  # stored-node ids
    starts, ends = tree.node_offsets[flat], tree.node_offsets[flat + 1]
    counts = ends - starts
    # positions = concat(arange(start, end)) for every selected node, without a Python loop
    total = int(counts.sum())
    base = torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts)
    positions = base + torch.arange(total)
    chunk_of_node = chunks.repeat_interleave(selected.shape[1])
    chunk_index = torch.repeat_interleave(chunk_of_node, counts)

    # a position's token: its chunk's first token + the kept offset of its place in the chunk;
    # one lookup per distinct chunk length (every chunk but a short last one shares the layout)
    lengths = torch.tensor(tree.chunk_lengths, dtype=torch.long)
    chunk_start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])  # [C]
    place = positions - tree.node_offsets[chunk_index * n]  # [S] within its chunk's stored positions
    token_index = chunk_start[chunk_index]
    position_length = lengths[chunk_index]
    for length in torch.unique(position_length).tolist():
        rows = position_length == length
        token_index[rows] += chunk_kept_offsets(length, tree.config)[place[rows]]

    def decoded(codes: Tensor, scales: Tensor | None) -> Tensor:
        return decode_kv(codes[:, :, positions], None if scales is None else scales[:, :, positions])

    return Gathered(keys=decoded(tree.keys, tree.key_scales), values=decoded(tree.values, tree.value_scales),
                    chunk_index=chunk_index, token_ids=tree.tokens[token_index].long())

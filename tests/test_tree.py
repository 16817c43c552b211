"""Chunking, node layout, kept positions and search follow method.md §2-4."""

from __future__ import annotations

import pytest
import torch

from ctxtree.kernels.compressor import compress_nodes
from ctxtree.kernels.tree import (NOT_INJECTED, ContextTree, RouteQuery, TreeConfig, build_tree, chunk_bounds, gather_nodes,
                          keep_per_node, kept_positions, node_spans, search, search_documents, slice_tree,
                          token_match_scores)
from ctxtree.kernels.compressor import route_query


@pytest.mark.parametrize("n_tokens,chunk_len", [(1, 4), (1024, 1024), (1025, 1024), (5000, 512), (37, 8)])
def test_every_token_in_exactly_one_chunk(n_tokens, chunk_len):
    bounds = chunk_bounds(n_tokens, chunk_len)
    covered = [t for s, e in bounds for t in range(s, e)]
    assert covered == list(range(n_tokens))
    assert all(e - s == chunk_len for s, e in bounds[:-1]) and 1 <= bounds[-1][1] - bounds[-1][0] <= chunk_len


@pytest.mark.parametrize("length,height", [(1024, 3), (1000, 3), (513, 2), (7, 3), (1, 3), (130, 4)])
def test_node_layout_halves_each_node(length, height):
    spans = node_spans(length, height)
    assert len(spans) == 2 ** (height + 1) - 1 and spans[0] == (0, length)
    for i in range(2 ** height - 1):
        (s, e), left, right = spans[i], spans[2 * i + 1], spans[2 * i + 2]
        assert left == (s, s + (e - s) // 2) and right == (s + (e - s) // 2, e)
    for w in range(height + 1):  # each level tiles the chunk
        level = spans[2 ** w - 1: 2 ** (w + 1) - 1]
        assert [t for s, e in level for t in range(s, e)] == list(range(length))


def test_kept_positions_match_method():
    # L=1024, p=32: 32 positions per node, the last token of each window
    assert kept_positions(512, 32) == [(j + 1) * 16 - 1 for j in range(32)]
    assert kept_positions(128, 32) == [(j + 1) * 4 - 1 for j in range(32)]
    assert kept_positions(20, 32) == list(range(20))  # shorter than p: keep all
    assert kept_positions(100, 7) == [(j + 1) * 100 // 7 - 1 for j in range(7)]
    cfg = TreeConfig(chunk_len=1024, keep=32)
    assert keep_per_node(1024, cfg) == 32
    assert keep_per_node(512, cfg) == 16   # a half-length last chunk keeps the same ratios
    assert keep_per_node(10, cfg) == 1     # but at least one position per node
    cfg = TreeConfig(chunk_len=512, keep=16, height=2)
    assert keep_per_node(512, cfg) == 16 and keep_per_node(300, cfg) == 9


@pytest.mark.parametrize("n_tokens,chunk_len,height,keep", [(64, 32, 3, 4), (75, 32, 3, 4), (67, 32, 2, 8),
                                                            (40, 16, 3, 2), (33, 32, 3, 4), (19, 16, 3, 4)])
def test_built_tree_keeps_the_right_positions(tiny_model, n_tokens, chunk_len, height, keep):
    cfg = TreeConfig(n_layers=2, chunk_len=chunk_len, height=height, keep=keep, codec="fp32")
    ids = torch.randint(3, 97, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    tree = build_tree(tiny_model, ids, cfg, max_batch_tokens=40)
    bounds = chunk_bounds(n_tokens, chunk_len)
    assert tree.chunk_lengths == [e - s for s, e in bounds] and tree.n_tokens == n_tokens
    counts = tree.node_counts()
    for c, (cs, ce) in enumerate(bounds):
        spans = node_spans(ce - cs, height)[1:]
        k = keep_per_node(ce - cs, cfg)
        for j, (s, e) in enumerate(spans):
            want = kept_positions(e - s, k) if e > s else []
            assert counts[c, j] == len(want)
            if not want:
                assert not tree.routes[c, j].any()
                continue
            ref = compress_nodes(tiny_model, [ids[cs + s:cs + e]], 2)
            lo = int(tree.node_offsets[c * cfg.n_nodes + j])
            for i in range(2):
                torch.testing.assert_close(tree.keys[i][:, lo:lo + len(want)], ref.keys[i][0][:, want])
                torch.testing.assert_close(tree.values[i][:, lo:lo + len(want)], ref.values[i][0][:, want])
            torch.testing.assert_close(tree.routes[c, j], ref.routes[0])


def test_full_chunk_sizes_match_method(tiny_model):
    cfg = TreeConfig(n_layers=1, chunk_len=1024, height=3, keep=32)
    tree = build_tree(tiny_model, torch.randint(3, 97, (1024,)), cfg)
    assert tree.config.n_nodes == 14 and tree.keys.shape[2] == 448  # 0.4375 per token
    assert tree.keys.dtype == torch.int8 and tree.key_scales.shape == (1, tree.keys.shape[1], 448)  # default codec


def synthetic_tree(routes: torch.Tensor, height: int, counts: torch.Tensor | None = None) -> ContextTree:
    c, n, d = routes.shape
    cfg = TreeConfig(n_layers=1, chunk_len=64, height=height, keep=2, codec="fp32")
    counts = counts if counts is not None else torch.full((c, n), 2)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.reshape(-1).cumsum(0)])
    p = int(offsets[-1])
    keys = torch.arange(p, dtype=torch.float32).view(1, 1, p, 1).expand(1, 1, p, 2).clone()
    return ContextTree(cfg, [64] * c, 0, keys, keys.clone(), routes, offsets, torch.zeros(64 * c, dtype=torch.int32))


def by_vector(vector: torch.Tensor) -> RouteQuery:
    """A query for policy "vector" (the token parts are unused there)."""
    return RouteQuery(vector=vector, token_vectors=torch.zeros(1, 4), embed=torch.zeros(1, 4))


def test_search_descends_toward_the_query_per_chunk():
    # h=3: nodes 1,2 (level 1), 3..6 (level 2), 7..14 (level 3); routes are one-hot "directions"
    d = 16
    routes = torch.zeros(2, 14, d)
    for node in range(1, 15):
        routes[:, node - 1, node] = 1.0
    q = torch.zeros(d)
    q[[2, 5]] = 1.0   # closest: node 2 at level 1, then node 5 (left child of 2) at level 2
    # chunk 1 prefers the other way: its own routes make node 1 and node 4 closer
    routes[1, 0] = q * 2 + 0.1
    routes[1, 3] = q * 2 + 0.1
    tree = synthetic_tree(routes, 3)
    sel = search(tree, by_vector(q), "vector")
    assert sel[0].tolist() == [1, 6, 11, 12]   # inject sibling 1, sibling 6, both children of 5
    assert sel[1].tolist() == [2, 3, 9, 10]    # its own pairs: chose 1, then 4 -> children 9, 10
    right = search(tree, by_vector(q), "right")
    assert right.tolist() == [[1, 5, 13, 14]] * 2


def test_search_never_chooses_an_empty_child():
    routes = torch.randn(1, 6, 8)
    counts = torch.tensor([[0, 2, 0, 0, 1, 1]])   # node 1 empty (and its children 3, 4)
    tree = synthetic_tree(routes, 2, counts)
    q = routes[0, 0].clone()                       # the empty node's route is "closest"
    sel = search(tree, by_vector(q), "vector")
    assert sel.tolist() == [[1, 5, 6]]


def test_gather_returns_each_selected_nodes_positions():
    routes = torch.randn(2, 6, 4)
    tree = synthetic_tree(routes, 2)
    sel = torch.tensor([[1, 5, 6], [2, 3, 4]])
    g = gather_nodes(tree, sel)
    k, chunk = g.keys, g.chunk_index
    # node j of chunk c owns positions (c*6 + j-1)*2 .. +2
    want = [(c * 6 + j - 1) * 2 + t for c in range(2) for j in sel[c].tolist() for t in range(2)]
    assert k[0, 0, :, 0].long().tolist() == want
    assert chunk.tolist() == [0] * 6 + [1] * 6


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="codec"):
        TreeConfig(codec="int3")
    with pytest.raises(ValueError, match="height"):
        TreeConfig(height=0)
    with pytest.raises(ValueError, match="unknown tree config keys"):
        TreeConfig.from_dict({"n_layers": 4, "bogus": 1})
    with pytest.raises(ValueError, match="policy"):
        search(synthetic_tree(torch.randn(1, 6, 4), 2), by_vector(torch.randn(4)), "left")


def test_search_ties_go_left_like_argmax():
    routes = torch.ones(1, 6, 4)   # identical halves give identical routing vectors
    assert search(synthetic_tree(routes, 2), by_vector(torch.ones(4)), "vector").tolist() == [[2, 3, 4]]


def test_query_search_descends_to_the_node_holding_the_questions_words(tiny_model):
    # Two chunks of filler tokens; chunk 1's finest node 12 (tokens [320, 384) of the chunk)
    # holds the question's "words", which occur nowhere else. Search must descend to it.
    cfg = TreeConfig(n_layers=2, chunk_len=512, height=3, keep=8, codec="fp32")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, 60, (1024,), generator=g)
    words = [71, 88, 93, 64]
    start, end = node_spans(512, 3)[12]
    assert (start, end) == (320, 384)
    tokens[512 + start + 20:512 + start + 24] = torch.tensor(words)
    tree = build_tree(tiny_model, tokens, cfg)
    assert torch.equal(tree.tokens, tokens.to(torch.int32))
    route = route_query(tiny_model, torch.zeros(tiny_model.cfg.hidden_size), words)
    sel = search(tree, route, "query")
    assert sel[1].tolist() == [1, 6, 11, 12]   # right half (node 2), its left child (5), finest 11 and 12
    # per level, the node on the path scores above its sibling
    scores = token_match_scores(tree, route)
    assert scores[1, 1] > scores[1, 0] and scores[1, 4] > scores[1, 5] and scores[1, 11] > scores[1, 10]
    # every question token occurs in node 12: each contributes its best cosine, 1
    assert scores[1, 11].item() == pytest.approx(len(words), abs=1e-4)
    assert scores[0].max().item() < len(words) - 0.1   # chunk 0 holds none of them


def test_search_documents_keeps_the_best_matching_chunks_and_one_per_document(tiny_model):
    # Document A: 4 chunks, the question's words in chunk 2, half of them in chunk 0.
    # Document B: 2 chunks, none of the words. top_chunks 2: A's chunk 2 and B's best
    # (every document keeps one), not A's chunk 0, though it matches better than B's.
    cfg = TreeConfig(n_layers=2, chunk_len=64, height=3, keep=8, codec="fp32")
    g = torch.Generator().manual_seed(4)
    words = [71, 88, 93, 64]
    a = torch.randint(3, 60, (256,), generator=g)
    a[2 * 64 + 10:2 * 64 + 14] = torch.tensor(words)
    a[0 * 64 + 40:0 * 64 + 42] = torch.tensor(words[:2])
    b = torch.randint(3, 60, (128,), generator=g)
    trees = [build_tree(tiny_model, a, cfg), build_tree(tiny_model, b, cfg)]
    route = route_query(tiny_model, torch.zeros(tiny_model.cfg.hidden_size), words)

    every = search_documents(trees, route, "query", top_chunks=0)
    assert all((s != NOT_INJECTED).all() for s in every)
    assert torch.equal(every[0], search(trees[0], route, "query"))

    two = search_documents(trees, route, "query", top_chunks=2)
    injected = [[c for c in range(t.n_chunks) if (s[c] != NOT_INJECTED).any()] for t, s in zip(trees, two)]
    assert injected[0] == [2] and len(injected[1]) == 1
    assert torch.equal(two[0][2], every[0][2])          # a kept chunk keeps its path
    three = search_documents(trees, route, "query", top_chunks=3)
    assert [c for c in range(4) if three[0][c].any()] == [0, 2]   # the next best overall is A's chunk 0
    # "right" does not read the question: it keeps every chunk whatever top_chunks says
    assert all((s != NOT_INJECTED).all() for s in search_documents(trees, route, "right", top_chunks=1))
    with pytest.raises(ValueError, match="top_chunks"):
        search_documents(trees, route, "query", top_chunks=-1)


def test_left_out_chunks_are_skipped_and_the_rest_renumbered(tiny_model):
    # Injecting chunks 1 and 3 of a tree must give exactly the K/V (RoPE included) of a
    # two-chunk tree made of those chunks: what the decoder reads does not depend on
    # how many chunks the document had.
    from ctxtree.kernels.inject import InjectionDecoder
    from ctxtree.pipelines.chunk_pool import assemble

    cfg = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4, codec="fp32")
    tokens = torch.randint(3, 97, (128,), generator=torch.Generator().manual_seed(5))
    tree = build_tree(tiny_model, tokens, cfg)
    route = route_query(tiny_model, torch.zeros(tiny_model.cfg.hidden_size), [5, 6, 7])
    full = search(tree, route, "query")
    sel = full.clone()
    sel[[0, 2]] = NOT_INJECTED
    assert sorted(set(gather_nodes(tree, sel).chunk_index.tolist())) == [1, 3]
    small = assemble([slice_tree(tree, 1, 2), slice_tree(tree, 3, 4)])
    dec = InjectionDecoder(tiny_model, 2)
    got = dec.request_kv([tree], [sel])
    want = dec.request_kv([small], [full[[1, 3]]])
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert torch.equal(got.token_ids, want.token_ids)


def test_gathered_positions_carry_the_document_token_they_sit_on(tiny_model):
    cfg = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4, codec="fp32")
    tokens = torch.randint(3, 97, (80,), generator=torch.Generator().manual_seed(8))  # 2 full chunks + 16
    tree = build_tree(tiny_model, tokens, cfg)
    every = torch.arange(1, cfg.n_nodes + 1).repeat(tree.n_chunks, 1)
    g = gather_nodes(tree, every)
    want = []
    for c, (start, end) in enumerate(chunk_bounds(80, 32)):
        keep = max(1, cfg.keep * (end - start) // cfg.chunk_len)
        for s, e in node_spans(end - start, cfg.height)[1:]:
            want += [int(tokens[start + s + k]) for k in kept_positions(e - s, keep)]
    assert g.token_ids.tolist() == want and g.keys.shape[2] == len(want)
    # and the same tokens when only some chunks and nodes are injected
    sel = every[:, :4].clone()
    sel[1] = NOT_INJECTED
    part = gather_nodes(tree, sel)
    assert set(part.chunk_index.tolist()) == {0, 2}
    assert set(part.token_ids.tolist()) <= set(want)

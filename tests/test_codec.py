"""Stored K/V codecs: int8 and fp8 trees take about half of bf16's bytes, and what a
request injects from them stays within a measured error of the bf16 trees (the accuracy
gate; tests/test_quality.py holds the answers with the default codec)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ctxtree.kernels.codec import CODECS, decode_kv, encode_kv
from ctxtree.kernels.tree import TreeConfig, build_tree, gather_nodes

REPO = Path(__file__).resolve().parent.parent
# Relative error (Frobenius) of every stored K and V of GPL-3's first 1,024 tokens against
# the bf16 tree, measured 2026-12-04: int8 keys 0.0104, values 0.0078; fp8 0.0219 / 0.0241.
ERROR_BOUND = {"int8": 0.015, "fp8": 0.035}


def test_default_is_int8():
    assert TreeConfig().codec == "int8"


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_round_trip_error_is_bounded_per_group(name):
    codec = CODECS[name]
    x = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 50)[:, None]
    x[0, 0, 0] = 0.0  # an all-zero group
    codes, scales = encode_kv(x, codec)
    assert codes.dtype == codec.dtype and scales.shape == (2, 3, 50) and scales.dtype == torch.bfloat16
    back = decode_kv(codes, scales)
    assert back.shape == x.shape and torch.equal(back[0, 0, 0], x[0, 0, 0])
    # every value within half a code step (int8) / 1/16 relative (e4m3: 3 mantissa bits) of
    # its group's largest magnitude, whatever the group's scale (1e-3 .. 1e2 here)
    group_max = x.abs().amax(-1, keepdim=True)
    tolerance = group_max / 127 * 0.5 * 1.01 if name == "int8" else x.abs() / 16 + group_max / 448 * 2 ** -6
    assert bool(((back - x).abs() <= tolerance + 1e-12).all())


def test_float_codecs_are_a_plain_cast():
    x = torch.randn(2, 2, 5, 8)
    codes, scales = encode_kv(x, CODECS["bf16"])
    assert scales is None and codes.dtype == torch.bfloat16 and decode_kv(codes, None) is codes


def test_non_finite_values_are_refused():
    x = torch.zeros(1, 1, 2, 4)
    x[0, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encode_kv(x, CODECS["int8"])


def test_bytes_per_level_account_for_the_whole_tree(tiny_model):
    from bench.codec import bytes_per_level

    tree = build_tree(tiny_model, torch.randint(3, 97, (128,), generator=torch.Generator().manual_seed(1)),
                      TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4))
    per_level = bytes_per_level(tree)
    assert list(per_level) == ["level1", "level2", "level3", "routes", "tokens"]
    assert per_level["level1"] * 2 == pytest.approx(per_level["level2"])  # p positions per node, 2x the nodes
    offsets = tree.node_offsets.numel() * tree.node_offsets.element_size()
    assert sum(per_level.values()) * tree.n_tokens == pytest.approx(tree.nbytes() - offsets)


def test_real_trees_are_half_the_bytes_and_close_to_bf16(smollm_runtime):
    rt = smollm_runtime
    ids = torch.tensor(rt.tokenizer((REPO / "samples" / "GPL-3.txt").read_text())["input_ids"][:1024])
    trees = {c: build_tree(rt.model, ids, replace(rt.tree_config, codec=c)) for c in ("bf16", "int8", "fp8")}
    every_node = torch.arange(1, trees["bf16"].config.n_nodes + 1).repeat(trees["bf16"].n_chunks, 1)
    ref = gather_nodes(trees["bf16"], every_node)
    ref_k, ref_v = ref.keys, ref.values
    for name, bound in ERROR_BOUND.items():
        tree = trees[name]
        assert tree.nbytes() < 0.53 * trees["bf16"].nbytes()  # codes + 3% scales, routes kept in bf16
        assert torch.equal(tree.tokens, trees["bf16"].tokens) and torch.equal(tree.node_offsets, trees["bf16"].node_offsets)
        g = gather_nodes(tree, every_node)
        k, v = g.keys, g.values
        assert k.dtype == torch.float32
        for got, ref in ((k, ref_k.float()), (v, ref_v.float())):
            assert float((got - ref).norm() / ref.norm()) < bound, name

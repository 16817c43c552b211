"""Search on real text: policy `query` injects the asked value's own finest node."""

from __future__ import annotations

import torch

from bench.quality import injected_level
from ctxtree.prompt import question_prompt, question_tokens
from ctxtree.kernels.compressor import query_vector, route_query
from ctxtree.kernels.generate import left_pad
from ctxtree.kernels.tree import build_tree, search
from ctxtree.pipelines.data import load_haystack, make_sample


def test_query_search_reaches_the_asked_value_on_held_out_questions(smollm_runtime):
    rt = smollm_runtime
    haystack = load_haystack(rt.tokenizer, "heldout")
    height = rt.tree_config.height
    finest = {"query": 0, "right": 0}
    n = 0
    for i in range(8):
        s = make_sample(rt.tokenizer, haystack, i, 1024, "single" if i % 2 else "paraphrase", seed=11)
        tree = build_tree(rt.model, torch.tensor(s.documents[0]), rt.tree_config)
        prompt, query_index = question_prompt(rt.tokenizer, s.question)
        batch = left_pad([prompt])
        q = query_vector(rt.model, batch.input_ids, batch.positions, batch.token_valid, torch.tensor([query_index]))
        route = route_query(rt.model, q[0], question_tokens(rt.tokenizer, s.question))
        (_, position), = s.answer_positions
        for policy in finest:
            finest[policy] += injected_level(tree, search(tree, route, policy), position) == height
        n += 1
    # a value sits in 1 of 8 finest nodes: "right" reaches it 1 time in 4 (the right
    # quarter's two finest nodes), a coin-flip router too; token match nearly always
    assert finest["query"] >= 7, finest
    assert finest["query"] > finest["right"] + 2, finest

"""The shipped adapter reads the document: held-out single-fact questions over 4K-token
documents (haystack text, entities, templates and phrasings never seen in training),
answered freely, against the zero-initialised decoder (exactly the base model)."""

from __future__ import annotations

import torch

from ctxtree.answer import answer_question
from ctxtree.runtime import SHIPPED_ADAPTERS, load_runtime
from kernels.generate import SamplingConfig
from kernels.inject import InjectionDecoder
from kernels.tree import build_tree
from pipelines.data import is_correct, load_haystack, make_sample

QUESTIONS = 10
LENGTH = 4096
SEED = 5  # chosen before the adapter was measured on it; never tuned to the result


def test_shipped_adapter_answers_held_out_needle_questions(smollm_dir):
    rt = load_runtime(smollm_dir)  # the default configuration: the shipped adapter
    assert rt.adapter_dir is not None and rt.adapter_dir.parent == SHIPPED_ADAPTERS, rt.adapter_dir
    trained = rt.decoder
    zero = InjectionDecoder(rt.model, rt.tree_config.n_layers).eval()
    haystack = load_haystack(rt.tokenizer, "heldout")
    sampling = SamplingConfig(max_tokens=16)
    correct = {"trained": 0, "zero": 0}
    answers = []
    for i in range(QUESTIONS):
        s = make_sample(rt.tokenizer, haystack, i, LENGTH, "single", seed=SEED, align=rt.tree_config.chunk_len)
        trees = [build_tree(rt.model, torch.tensor(d), rt.tree_config) for d in s.documents]
        for name, decoder in (("trained", trained), ("zero", zero)):
            rt.decoder = decoder
            text = answer_question(rt, trees, s.question, sampling).text
            correct[name] += is_correct(text, s)
            answers.append((name, s.answers, text))
    rt.decoder = trained
    assert correct["trained"] >= 8, (correct, answers)
    assert correct["zero"] <= 2, (correct, answers)

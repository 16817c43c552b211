"""The shipped adapter answers held-out needle questions over 4K-token documents (the
zero-initialised decoder, the base model blind to the trees, does not), answers held-out
lookups whose answer is a word or a name, and answers held-out prose questions about real
text in words, recovering a measured share of what the text tells the base model.

Held-out means haystack text, needle templates and question phrasings never used in
training (ctxtree/pipelines/data.py). Seed 5 is not a seed any training run or the quality
benchmark (seed 0) uses. bench/quality.py measures the whole curve; this is the
regression guard that runs on every change.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ctxtree.answer import answer_question
from ctxtree.runtime import load_runtime
from ctxtree.kernels.generate import SamplingConfig
from ctxtree.kernels.inject import InjectionDecoder
from ctxtree.kernels.tree import build_tree
from ctxtree.pipelines.data import is_correct, load_haystack, make_sample, numbers_only
from ctxtree.pipelines.prose import heldout_prose
from ctxtree.pipelines.train_step import Example, information_recovered
from ctxtree.prompt import end_of_turn_id

QUESTIONS = 10
LENGTH = 4096
WORD_LENGTH = 2048
# Issue 15's bar for an adapter that reads: on 10 held-out prose questions its answers are
# words, and the trees tell it a measured share of what the text tells the base model. The
# shipped adapter (trained with reading layers, docs/quality.md "Reading layers") recovered
# 0.73 on these items (2026-12-05; the digits specialist before it: -5.9, every answer a
# number); the bound is the bench's target, leaving 0.23 for noise and small regressions.
RECOVERED_BOUND = 0.5


def test_shipped_adapter_answers_held_out_questions_at_4k(smollm_dir):
    rt = load_runtime()
    assert rt.adapter_dir is not None, "no adapter ships for the default model"
    haystack = load_haystack(rt.tokenizer, "heldout")
    zero = replace(rt, decoder=InjectionDecoder(rt.model, rt.tree_config.n_layers).eval())
    sampling = SamplingConfig(max_tokens=16)
    right, right_zero, answers = 0, 0, []
    for i in range(QUESTIONS):
        s = make_sample(rt.tokenizer, haystack, i, LENGTH, "single", seed=5, align=rt.tree_config.chunk_len)
        assert sum(len(d) for d in s.documents) == LENGTH
        trees = [build_tree(rt.model, torch.tensor(d), rt.tree_config) for d in s.documents]
        answer = answer_question(rt, trees, s.question, sampling)
        right += is_correct(answer.text, s)
        right_zero += is_correct(answer_question(zero, trees, s.question, sampling).text, s)
        answers.append((s.question, s.answers, answer.text))
    assert right >= 8, answers
    assert right_zero <= 2


def test_shipped_adapter_answers_word_and_name_lookups(smollm_dir):
    rt = load_runtime()
    haystack = load_haystack(rt.tokenizer, "heldout")
    right, answers = 0, []
    for i in range(QUESTIONS):
        s = make_sample(rt.tokenizer, haystack, i, WORD_LENGTH, "single", seed=5, align=rt.tree_config.chunk_len,
                        values=("word", "name")[i % 2])
        assert not s.answers[0].isdigit()
        trees = [build_tree(rt.model, torch.tensor(d), rt.tree_config) for d in s.documents]
        answer = answer_question(rt, trees, s.question, SamplingConfig(max_tokens=16))
        right += is_correct(answer.text, s)
        answers.append((s.question, s.answers, answer.text))
    assert right >= 6, answers


@pytest.fixture(scope="module")
def prose_items(smollm_dir):
    """The 10 held-out prose questions (teacher answers made once for the module's tests)."""
    rt = load_runtime()
    items = heldout_prose(rt, QUESTIONS, seed=5)
    assert len(items) == QUESTIONS
    return rt, items


def prose_scores(rt, items) -> tuple[dict, list[tuple[str, str]]]:
    """(information recovered by rt.decoder, its answers) on the held-out prose items."""
    zero = InjectionDecoder(rt.model, rt.tree_config.n_layers).eval()
    examples = [Example(trees=[tree], question=e.question, target=e.answer, teacher=e.teacher) for e, tree in items]
    recovered = information_recovered(rt.decoder, zero, rt.tokenizer, end_of_turn_id(rt.tokenizer), examples)
    answers = [(e.question, answer_question(rt, [tree], e.question, SamplingConfig(max_tokens=32)).text)
               for e, tree in items]
    return recovered, answers


def test_shipped_adapter_answers_prose_questions_in_words(prose_items):
    rt, items = prose_items
    recovered, answers = prose_scores(rt, items)
    assert not [a for a in answers if numbers_only(a[1])], answers
    assert recovered["recovered"] >= RECOVERED_BOUND, (recovered, answers)


# Reading layers with no trained weights (kernels/reading.py: the base model with the
# selected chunks' text before the prompt) on the same 10 items: no answer only a number,
# and a share recovered well above the digits specialist's (below 0); 0.35 when reading
# read only the tree's kept positions of each node (2026-12-04), more with the whole text.
READING_RECOVERED_BOUND = 0.2


def test_reading_layers_answer_prose_questions_from_the_passage(prose_items):
    rt, items = prose_items
    reading = replace(rt, decoder=InjectionDecoder(rt.model, rt.tree_config.n_layers, top_chunks=2,
                                                   reading_from=0).eval())
    recovered, answers = prose_scores(reading, items)
    assert not [a for a in answers if numbers_only(a[1])], answers
    assert recovered["recovered"] >= READING_RECOVERED_BOUND, (recovered, answers)

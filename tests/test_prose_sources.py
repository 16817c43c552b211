"""Passages for prose questions (TrainConfig.prose_passages "wide"): other kinds of text than
the lookup haystack, enough of them that a 2,048-example prose set sees each passage once,
and none of the held-out text."""

from __future__ import annotations

import zipfile

from ctxtree.kernels.weights import load_tokenizer
from ctxtree.pipelines.data import (PROSE_DIR, haystack_texts, load_haystack, play_text,
                                    wide_prose_texts)
from ctxtree.pipelines.prose import passage_order


def test_wide_passages_are_the_training_haystack_plus_other_kinds_of_text():
    wide = wide_prose_texts()
    names = [n for n, _ in wide]
    train = haystack_texts("train")
    assert wide[:len(train)] == train  # the lookups' haystack comes first, unchanged
    kinds = {n.split(":")[0] for n in names[len(train):]}
    assert kinds == {"state_union", "genesis-kjv", "shakespeare"}
    assert sum(n.startswith("state_union:") for n in names) == 65
    assert sum(n.startswith("shakespeare:") for n in names) == 8
    heldout = haystack_texts("heldout")
    assert not {n for n, _ in heldout} & set(names)
    # no held-out line (of any length worth a question) appears in the training passages
    wide_text = "\n".join(t for _, t in wide)
    lines = [ln.strip() for _, t in heldout for ln in t.splitlines() if len(ln.strip()) > 60]
    assert lines and not [ln for ln in lines if ln in wide_text]


def test_wide_haystack_holds_more_than_2000_distinct_passages(smollm_dir):
    tokenizer = load_tokenizer(smollm_dir)
    wide = load_haystack(tokenizer, "train", wide_prose_texts(), label="train-wide")
    lookups = load_haystack(tokenizer, "train")
    assert wide.label == "train-wide" and lookups.label == "train"
    assert wide.tokens[:len(lookups)] == lookups.tokens
    n = len(wide) // 256
    assert n >= 3 * len(lookups) // 256 and n > 2048
    order = passage_order(n, "train", "train-wide", seed=3)
    assert sorted(order) == list(range(n)) and order[:2048] != sorted(order[:2048])  # shuffled, each once
    # the first 2,048 reach the new kinds of text, not only the first ~600 chunks
    assert sum(c >= len(lookups) // 256 for c in order[:2048]) > 1500
    assert passage_order(n, "train", "train", seed=3) == list(range(n))  # the lookup haystack: in order


def test_plays_read_as_speeches_with_their_speakers():
    with zipfile.ZipFile(PROSE_DIR / "shakespeare.zip") as z:
        text = play_text(z.read("shakespeare/hamlet.xml").decode())
    assert text.startswith("The Tragedy of Hamlet, Prince of Denmark\n")
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "Enter Ghost" in text and "<" not in text
    assert "Jon Bosak" not in text  # the markup's credits are not the play

"""Distillation (ctxtree/pipelines/teacher.py, train_step.py): the teacher's top-k targets,
the KL the student is trained on, and the cached examples' round trip."""

from __future__ import annotations

import math

import pytest
import torch

from ctxtree.pipelines.prose import ProseExample, load_examples, save_examples
from ctxtree.pipelines.teacher import FILL_LOGP, TeacherAnswer, teach, whole_sentences
from ctxtree.pipelines.train_step import kl_to_teacher


def test_kl_is_zero_for_the_teacher_itself_and_grows_with_disagreement():
    torch.manual_seed(0)
    logits = torch.randn(5, 100) * 3
    top = torch.log_softmax(logits, -1).topk(100)  # k = V: the KL is the exact one
    assert kl_to_teacher(logits, top.indices, top.values).abs().max() < 1e-5
    other = logits + torch.randn(5, 100)
    exact = (torch.softmax(logits, -1) * (torch.log_softmax(logits, -1) - torch.log_softmax(other, -1))).sum(-1)
    assert torch.allclose(kl_to_teacher(other, top.indices, top.values), exact, atol=1e-4)
    # top-k: the teacher's k probabilities renormalised; a one-hot row is cross-entropy
    k8 = torch.log_softmax(logits, -1).topk(8)
    assert (kl_to_teacher(other, k8.indices, k8.values) >= -1e-6).all()
    ids = torch.full((1, 8), 7)
    logp = torch.full((1, 8), FILL_LOGP)
    logp[0, 0] = 0.0
    ce = -torch.log_softmax(other[:1], -1)[0, 7]
    assert torch.allclose(kl_to_teacher(other[:1], ids, logp)[0], ce, atol=1e-4)
    assert not torch.isnan(kl_to_teacher(other[:1], ids, logp)).any()


def test_teacher_answers_carry_their_top_k_and_round_trip(tiny_model, tmp_path):
    out = teach(tiny_model, [[5, 6, 7, 8], [9, 10]], stop_ids=(3,), max_tokens=6, k=4, batch=2)
    assert len(out) == 2
    for tokens, ids, logp, stopped in out:
        assert ids.shape == logp.shape == (len(tokens), 4)
        assert (ids[:, 0].tolist() == tokens)  # greedy: the most likely token is the one taken
        assert (logp[:, :-1] >= logp[:, 1:]).all() and (logp <= 0).all()
        assert stopped == (tokens[-1] == 3)
    tokens, ids, logp, _ = out[0]
    ex = ProseExample(chunk=4, question="What is it?", answer="it", kind="written",
                      teacher=TeacherAnswer(tokens=tokens, top_ids=ids, top_logp=logp))
    save_examples(tmp_path / "p.json", [ex])
    back = load_examples(tmp_path / "p.json")
    assert back == [ex] and back[0].teacher.tokens == tokens and torch.equal(back[0].teacher.top_ids, ids)
    (tmp_path / "p.safetensors").write_bytes(b"torn")
    assert load_examples(tmp_path / "p.json") is None  # made again, never half-read
    with pytest.raises(ValueError, match="do not fit"):
        TeacherAnswer(tokens=[1, 2], top_ids=ids, top_logp=logp)


def test_a_cut_off_answer_ends_at_its_last_sentence(smollm_dir):
    from ctxtree.kernels.weights import load_tokenizer

    tok = load_tokenizer(smollm_dir)
    tokens = tok("It is short. It goes on and", add_special_tokens=False)["input_ids"]
    k = 4
    ids = torch.zeros(len(tokens), k, dtype=torch.int32)
    logp = torch.full((len(tokens), k), -math.log(k))
    cut = whole_sentences(tok, tokens, ids, logp, end_id=2)
    assert tok.decode(cut.tokens[:-1]) == "It is short." and cut.tokens[-1] == 2
    assert cut.top_ids[-1, 0] == 2 and cut.top_logp[-1, 0] == 0 and cut.top_ids.shape[0] == len(cut.tokens)
    assert whole_sentences(tok, tok("and so on", add_special_tokens=False)["input_ids"], ids[:3], logp[:3], 2) is None
    # a decimal point is not the end of a sentence
    tokens = tok("It costs 3.5 units and", add_special_tokens=False)["input_ids"]
    assert whole_sentences(tok, tokens, ids[:len(tokens)], logp[:len(tokens)], 2) is None


@pytest.mark.parametrize("values", ["digits", "code", "word", "name", "date"])
def test_lookup_targets_are_the_tokens_the_document_holds(smollm_dir, values):
    """A copy head can only emit tokens the injected positions hold: the trained answer
    spells a value as running text does (" basalt" is one token, "basalt" two)."""
    from ctxtree.kernels.weights import load_tokenizer
    from ctxtree.pipelines.data import load_haystack, make_sample
    from ctxtree.prompt import value_tokens

    tok = load_tokenizer(smollm_dir)
    haystack = load_haystack(tok, "heldout")
    for i in range(4):
        s = make_sample(tok, haystack, i, 512, "single", seed=5, align=256, values=values)
        doc, target = s.documents[0], value_tokens(tok, s.answers[0])
        assert tok.decode(target).strip() == s.answers[0]
        assert any(doc[j:j + len(target)] == target for j in range(len(doc))), (s.answers[0], tok.decode(target))

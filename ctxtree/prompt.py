"""Turning a question into decoder input, and knowing which token is the question's last.

The routing query is taken at the last token of the question itself (method.md §6),
not at the chat template's trailing assistant header, which is the same for every
question and would make search blind to it.
"""

from __future__ import annotations


def question_prompt(tokenizer, question: str) -> tuple[list[int], int]:
    """(prompt token ids, index of the question's last token in them)."""
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = question + "\n"
    found = text.rfind(question)
    if found < 0:
        raise ValueError("the chat template rewrote the question; cannot locate its last token for search")
    q_end = found + len(question)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    query_index = max(i for i, (start, _) in enumerate(offsets) if start < q_end)
    return list(ids), query_index


def question_tokens(tokenizer, question: str) -> list[int]:
    """The question's own token ids, without the chat template: what search matches
    against the documents' tokens."""
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    return list(tokenizer(question, add_special_tokens=False)["input_ids"])


def document_tokens(tokenizer, text: str) -> list[int]:
    if not text.strip():
        raise ValueError("the document is empty")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

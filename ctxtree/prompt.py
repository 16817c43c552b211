"""Turning a question into decoder input, and knowing which token is the question's last.

The routing query is taken at the last token of the question itself (method.md §6),
not at the chat template's trailing assistant header, which is the same for every
question and would make search blind to it.
"""

from __future__ import annotations

# The base model given a text in its prompt (the quality benchmark's baselines, and the
# prose answers training distils from the base model)
TEXT_QUESTION_PROMPT = "Read the text and answer the question.\n\nText:\n{context}\n\nQuestion: {question}"


def chat_text(tokenizer, content: str) -> str:
    """One user turn in the model's chat template, ready for the assistant's answer
    (the content and a newline for a model without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    return content + "\n"


def chat_ids(tokenizer, content: str) -> list[int]:
    return list(tokenizer(chat_text(tokenizer, content), add_special_tokens=False)["input_ids"])


def question_prompt(tokenizer, question: str) -> tuple[list[int], int]:
    """(prompt token ids, index of the question's last token in them)."""
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    text = chat_text(tokenizer, question)
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


def value_tokens(tokenizer, value: str) -> list[int]:
    """A value as an answer spells it: the way it is tokenized in running text, so that a
    copy head can emit the very tokens the document holds. "basalt" alone is `bas` `alt`,
    in a sentence ` basalt` (one token): the leading space is kept. A value that starts
    with a digit has its own space token in running text (` ` `8` `6`...): that one is
    dropped, and the value's tokens are the same either way."""
    spaced = list(tokenizer(" " + value.strip(), add_special_tokens=False)["input_ids"])
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    return spaced[len(space):] if spaced[:len(space)] == space else spaced


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an answer: the chat template's end of turn, else end of text."""
    vocab = tokenizer.get_vocab()
    return vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id

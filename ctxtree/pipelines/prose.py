"""Prose examples for training: questions that are not lookups, with the answer the base
model itself gives when the passage is in its prompt (self-distillation).

Why: trained on needle lookups alone, the decoder answers every question with a number
("Who may copy this license?" -> "207"). Mixed with these, it keeps answering questions
about a passage in prose, as the base model would with the passage in front of it. Some
passages are needle chunks (text with facts and numbers in it): without them the decoder
learns "a number in the injected nodes -> say the number", whatever the question.

Half of the questions are fixed templates, half are written by the base model about the
passage ("write one question this text answers"), so they name the passage's own words
the way a user's question does. Examples are generated once per (split, seed, count)
and kept as JSON beside the compressed chunks; a step then costs nothing extra.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ctxtree.prompt import TEXT_QUESTION_PROMPT, chat_ids
from ctxtree.kernels.generate import SamplingConfig, generate
from ctxtree.kernels.inject import InjectionDecoder

TEMPLATES = {
    "train": (
        "What is this passage about?", "Summarize the text in one sentence.",
        "What is the main topic of the document?", "Who or what is described in the text?",
        "What happens in this part of the text?", "Describe the setting of the passage.",
        "Give a short summary of the document.", "What does the author describe here?",
        "Which people or places does the text mention?", "Explain the passage briefly.",
    ),
    "heldout": (
        "Tell me briefly what this document is about.", "What is described in the text?",
        "Sum up the passage in a sentence.", "Who is the text about?",
    ),
}
ASK_PROMPT = "Text:\n{context}\n\nWrite one short question that this text answers. Reply with the question only."


@dataclass(frozen=True)
class ProseExample:
    chunk: int          # the passage: index of a haystack chunk, or of a needle chunk if needle
    question: str
    answer: str
    needle: bool = False


def _greedy(decoder: InjectionDecoder, tokenizer, stop_ids: tuple[int, ...], prompts: list[list[int]],
            max_tokens: int, batch: int) -> list[tuple[str, bool]]:
    """(text, stopped on its own) per prompt, greedy, base model (no injection)."""
    out = []
    for i in range(0, len(prompts), batch):
        rows = prompts[i:i + batch]
        tokens: list[list[int]] = [[] for _ in rows]
        stopped = [False] * len(rows)
        for step in generate(decoder, rows, None, SamplingConfig(max_tokens=max_tokens), stop_ids):
            for r, t in enumerate(step):
                if t is None or stopped[r]:
                    continue
                if t in stop_ids:
                    stopped[r] = True
                else:
                    tokens[r].append(t)
        out += [(tokenizer.decode(t).strip(), s) for t, s in zip(tokens, stopped)]
    return out


def _whole_sentences(text: str) -> str:
    """A cut-off answer ends at its last full sentence (the target must not teach cutting off)."""
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    return text[:ends[-1]].strip() if ends else text


def make_prose_examples(decoder: InjectionDecoder, tokenizer, stop_ids: tuple[int, ...], chunks: list[int],
                        passages: list[list[int]], split: str, seed: int, max_tokens: int = 48,
                        batch: int = 8) -> list[ProseExample]:
    """One example per passage (passages[i]: the token ids of chunk chunks[i], haystack or needle).
    The decoder runs without context, i.e. as the base model."""
    rng = random.Random(f"prose:{split}:{seed}")
    texts = [tokenizer.decode(p) for p in passages]
    own = [i % 2 == 1 for i in range(len(passages))]  # every other passage: a model-written question
    asked = _greedy(decoder, tokenizer, stop_ids, [chat_ids(tokenizer, ASK_PROMPT.format(context=texts[i]))
                                                     for i in range(len(texts)) if own[i]], 24, batch)
    written = iter(asked)
    questions = []
    for i in range(len(texts)):
        q = ""
        if own[i]:
            text, _ = next(written)
            q = text.split("?")[0].strip().strip('"') + "?" if "?" in text else ""
        questions.append(q if len(q.split()) >= 3 else rng.choice(TEMPLATES[split]))
    answers = _greedy(decoder, tokenizer, stop_ids,
                      [chat_ids(tokenizer, TEXT_QUESTION_PROMPT.format(context=t, question=q)) for t, q in zip(texts, questions)],
                      max_tokens, batch)
    examples = []
    for i, (q, (a, stopped)) in enumerate(zip(questions, answers)):
        a = a if stopped else _whole_sentences(a)
        if a:
            examples.append(ProseExample(chunk=chunks[i], question=q, answer=a))
    return examples


def load_or_make(path: Path, make) -> list[ProseExample]:
    """The examples in `path` (JSON) or, the first time, make() them and write it atomically."""
    from ctxtree.pipelines.chunk_pool import _atomic_write

    if path.is_file():
        try:
            return [ProseExample(**e) for e in json.loads(path.read_text())]
        except (ValueError, TypeError):
            pass  # a stale or torn file: make it again
    examples = make()
    _atomic_write(path, json.dumps([asdict(e) for e in examples], indent=1).encode())
    return examples


PROSE_NEEDLES = 10 ** 7  # needle chunk indices of prose passages start here (lookups use 0, 1, ...)


def prose_tree(pool, example: ProseExample):
    """The passage's compressed chunk (pool: a ctxtree.pipelines.chunk_pool.ChunkPool)."""
    return pool.needle_chunk(example.chunk)[0] if example.needle else pool.haystack_chunk(example.chunk)


def prose_chunks(count: int, n_chunks: int, seed: int) -> list[int]:
    """Which haystack chunks become prose passages: `count` of the first n_chunks, seeded."""
    rng = random.Random(f"prose-chunks:{seed}")
    return sorted(rng.sample(range(n_chunks), min(count, n_chunks)))


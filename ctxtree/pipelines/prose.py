"""Prose examples for training: questions that are not lookups, answered by the teacher
(the base model with the passage's text in its prompt, ctxtree/pipelines/teacher.py),
with its top-k at every answer position, for distillation.

Why: trained on needle lookups alone, the decoder answers every question with a number
("Who may copy this license?" -> "207"). Some passages are needle chunks (text with
facts and values in it): without them the decoder learns "a value in the injected nodes
-> say the value", whatever the question.

Question kinds (KIND_CYCLE): half written by the base model about the passage ("write one
question this text answers", so they name the passage's own words the way a user's
question does), a third fixed templates, a sixth lookups about an entity the passage
does not mention ("absent": what the teacher says when the text lacks the answer). An
example costs about 1.8 s here and is made once: sets are kept beside the compressed
chunks, JSON (readable) plus safetensors (the teacher's tokens and top-k), in parts.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ctxtree.kernels.llama import Llama
from ctxtree.pipelines.data import PROSE_KINDS, absent_question
from ctxtree.pipelines.teacher import TOP_K, TeacherAnswer, ended_after, teach, teacher_model, whole_sentences
from ctxtree.prompt import TEXT_QUESTION_PROMPT, chat_ids

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


@dataclass
class ProseExample:
    chunk: int          # the passage: index of a haystack chunk, or of a needle chunk if needle
    question: str
    answer: str         # the teacher's answer, as text (for people; training uses teacher.tokens)
    needle: bool = False
    kind: str = "template"   # template | written (by the base model) | absent (the passage lacks the answer)
    teacher: TeacherAnswer | None = field(default=None, repr=False, compare=False)


# question kinds, in turn: half written by the base model about the passage, one in six
# about an entity the passage does not mention, the rest templates
KIND_CYCLE = ("absent", "written", "template", "written", "template", "written")
assert set(KIND_CYCLE) == set(PROSE_KINDS)


def _questions(teacher: Llama, tokenizer, stop_ids: tuple[int, ...], texts: list[str], kinds: list[str],
               split: str, rng: random.Random, batch: int) -> list[tuple[str, str]]:
    """(kind, question) per passage; a written question the model did not manage becomes a template."""
    ask = [i for i, k in enumerate(kinds) if k == "written"]
    written = teach(teacher, [chat_ids(tokenizer, ASK_PROMPT.format(context=texts[i])) for i in ask], stop_ids,
                    24, k=1, batch=batch)
    by_index = {}
    for i, (tokens, _, _, _) in zip(ask, written):
        text = tokenizer.decode([t for t in tokens if t not in stop_ids]).strip()
        q = text.split("?")[0].strip().strip('"') + "?" if "?" in text else ""
        by_index[i] = q if len(q.split()) >= 3 else ""
    out = []
    for i, kind in enumerate(kinds):
        if kind == "absent":
            out.append((kind, absent_question(rng, split)))
        elif by_index.get(i):
            out.append((kind, by_index[i]))
        else:
            out.append(("template", rng.choice(TEMPLATES[split])))
    return out


def make_prose_examples(teacher: Llama, tokenizer, stop_ids: tuple[int, ...], end_id: int, chunks: list[int],
                        passages: list[list[int]], split: str, seed: int, max_tokens: int = 64,
                        batch: int = 8, kinds: list[str] | None = None,
                        needles: list[bool] | None = None) -> list[ProseExample]:
    """One example per passage (passages[i]: the token ids of chunk chunks[i], a needle chunk
    if needles[i]), a question of kinds[i] (default: KIND_CYCLE in turn), answered by the
    teacher (ctxtree.pipelines.teacher) with the passage's text in its prompt, with its top-k
    at every answer position."""
    rng = random.Random(f"prose:{split}:{seed}")
    texts = [tokenizer.decode(p) for p in passages]
    kinds = kinds or [KIND_CYCLE[i % len(KIND_CYCLE)] for i in range(len(texts))]
    needles = needles or [False] * len(texts)
    questions = _questions(teacher, tokenizer, stop_ids, texts, kinds, split, rng, batch)
    answers = teach(teacher, [chat_ids(tokenizer, TEXT_QUESTION_PROMPT.format(context=t, question=q))
                              for t, (_, q) in zip(texts, questions)], stop_ids, max_tokens, batch=batch)
    examples = []
    for i, ((kind, q), (tokens, ids, logp, stopped)) in enumerate(zip(questions, answers)):
        if stopped and tokens[-1] == end_id:
            target = TeacherAnswer(tokens=tokens, top_ids=ids, top_logp=logp)
        elif stopped:  # another stop token (end of text): the student's label is end of turn, so is its target
            target = ended_after(tokens, ids, logp, len(tokens) - 1, end_id)
        else:
            target = whole_sentences(tokenizer, tokens, ids, logp, end_id)
        if target is None or len(target.tokens) < 2:
            continue
        examples.append(ProseExample(chunk=chunks[i], question=q, answer=tokenizer.decode(target.tokens[:-1]).strip(),
                                     needle=needles[i], kind=kind, teacher=target))
    return examples


def save_examples(path: Path, examples: list[ProseExample]) -> None:
    """<path> (JSON: the questions and answers, readable) and <path>.safetensors (the teacher's
    tokens and top-k); the JSON is written last, so its presence means both are whole."""
    from ctxtree.pipelines.chunk_pool import _atomic_write

    tensors = {}
    for i, e in enumerate(examples):
        tensors[f"{i}.tokens"] = torch.tensor(e.teacher.tokens, dtype=torch.int32)
        tensors[f"{i}.ids"] = e.teacher.top_ids.contiguous()
        tensors[f"{i}.logp"] = e.teacher.top_logp.to(torch.float32).contiguous()
    _atomic_write(path.with_suffix(".safetensors"), save(tensors))
    meta = [{k: v for k, v in asdict(e).items() if k != "teacher"} for e in examples]
    _atomic_write(path, json.dumps(meta, indent=1).encode())


def load_examples(path: Path) -> list[ProseExample] | None:
    """The examples save_examples wrote, or None if they are absent, torn or stale."""
    weights = path.with_suffix(".safetensors")
    if not (path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(path.read_text())
        tensors = load(weights.read_bytes())
        return [ProseExample(**m, teacher=TeacherAnswer(tokens=tensors[f"{i}.tokens"].tolist(),
                                                        top_ids=tensors[f"{i}.ids"],
                                                        top_logp=tensors[f"{i}.logp"]))
                for i, m in enumerate(meta)]
    except (ValueError, TypeError, KeyError, RuntimeError, OSError, SafetensorError):
        return None  # a stale or torn file: make it again


def load_or_make(path: Path, make, parts: int = 1, log=None) -> list[ProseExample]:
    """The examples in `path`, made the first time: make(part) for part in range(parts), each
    part kept in its own file as soon as it is made (a killed run loses at most one part)."""
    out = []
    for part in range(parts):
        part_path = path if parts == 1 else path.with_name(f"{path.stem}-part{part:03d}{path.suffix}")
        made = load_examples(part_path)
        if made is None:
            made = make(part)
            save_examples(part_path, made)
            if log is not None:
                log(f"{part_path.name}: {len(made)} examples (part {part + 1} of {parts})")
        out += made
    return out


PROSE_NEEDLES = 10 ** 7  # needle chunk indices of prose passages start here (lookups use 0, 1, ...)


def prose_tree(pool, example: ProseExample):
    """The passage's compressed chunk (pool: a ctxtree.pipelines.chunk_pool.ChunkPool)."""
    return pool.needle_chunk(example.chunk)[0] if example.needle else pool.haystack_chunk(example.chunk)


def prose_chunks(count: int, n_chunks: int, seed: int) -> list[int]:
    """Which haystack chunks become prose passages: `count` of the first n_chunks, seeded."""
    rng = random.Random(f"prose-chunks:{seed}")
    return sorted(rng.sample(range(n_chunks), min(count, n_chunks)))



def passage_order(n_chunks: int, split: str, label: str, seed: int) -> list[int]:
    """The order prose_set uses a haystack's chunks in: the lookup haystack's in order (the
    sets made so far); a haystack of its own (data.wide_prose_texts) shuffled, so a set
    smaller than it still draws from every kind of text in it, each passage once."""
    order = list(range(n_chunks))
    if label != split:
        random.Random(f"prose-order:{label}:{seed}").shuffle(order)
    return order


def prose_set(pool, teacher: Llama, tokenizer, stop_ids: tuple[int, ...], end_id: int, count: int,
              needle_share: float, seed: int, cache_dir: Path, part_size: int = 128, log=None,
              batch: int = 8) -> list[ProseExample]:
    """`count` prose examples over the pool's passages (a ChunkPool): haystack chunks and, a
    needle_share of them, needle chunks of their own (facts and values in the text: without
    them the decoder learns "a value in the injected nodes -> say it", whatever the
    question). Passages are used in turn, each time with the next kind of question; made
    part by part and cached under cache_dir (the teacher runs once per example, ever).
    batch: prompts the teacher answers at once (8 on a CPU; 64 or more on a GPU)."""
    split, label = pool.haystack.split, pool.haystack.label
    plain = passage_order(pool.n_haystack_chunks, split, label, seed)
    chunks, needles, kinds = [], [], []
    n_needle = n_plain = 0
    for g in range(count):
        needle = int((g + 1) * needle_share) > int(g * needle_share)  # spread evenly
        if needle:
            chunks.append(PROSE_NEEDLES + n_needle)
            n_needle += 1
        else:
            chunks.append(plain[n_plain % len(plain)])
            n_plain += 1
        needles.append(needle)
        cycle = (n_plain - 1) // len(plain) if not needle else 0
        kinds.append(KIND_CYCLE[(g + cycle) % len(KIND_CYCLE)])  # a passage seen again gets another kind
    n_parts = (count + part_size - 1) // part_size
    if label != split:  # a haystack of its own: its text may change with the same chunk count
        label += "-" + hashlib.sha256(str(pool.haystack.tokens).encode()).hexdigest()[:8]
    name = (f"prose2-{label}-{seed}-{count}-{pool.n_haystack_chunks}-n{needle_share:g}-p{part_size}-k{TOP_K}-"
            f"{pool.needle_name(0)}.json")

    def make(part: int) -> list[ProseExample]:
        sl = slice(part * part_size, min(count, (part + 1) * part_size))
        passages = [pool.needle_chunk(c)[0].tokens.tolist() if nd else
                    pool.haystack.tokens[c * pool.cfg.chunk_len:(c + 1) * pool.cfg.chunk_len]
                    for c, nd in zip(chunks[sl], needles[sl])]
        return make_prose_examples(teacher, tokenizer, stop_ids, end_id, chunks[sl], passages, split,
                                   seed * 1000 + part, batch=batch, kinds=kinds[sl], needles=needles[sl])

    return load_or_make(Path(cache_dir) / name, make, n_parts, log)


def heldout_prose(rt, count: int, seed: int, teacher: Llama | None = None) -> list[tuple[ProseExample, object]]:
    """`count` held-out prose questions (written by the base model or templates) about
    distinct held-out passages, with the teacher's answers and each passage's tree: what
    the quality bench and the prose test score a decoder on (rt: a ctxtree.runtime.Runtime)."""
    from ctxtree.kernels.tree import build_tree
    from ctxtree.pipelines.data import load_haystack
    from ctxtree.prompt import end_of_turn_id

    haystack = load_haystack(rt.tokenizer, "heldout")
    L = rt.tree_config.chunk_len
    chunks = prose_chunks(count + count // 2, len(haystack) // L, seed)  # spares: a few answers are dropped
    passages = [haystack.tokens[c * L:(c + 1) * L] for c in chunks]
    kinds = [("written", "template")[i % 2] for i in range(len(chunks))]
    examples = make_prose_examples(teacher or teacher_model(rt.model), rt.tokenizer, rt.stop_ids,
                                   end_of_turn_id(rt.tokenizer), chunks, passages, "heldout", seed, kinds=kinds)
    by_chunk = dict(zip(chunks, passages))
    return [(e, build_tree(rt.model, torch.tensor(by_chunk[e.chunk]), rt.tree_config)) for e in examples[:count]]

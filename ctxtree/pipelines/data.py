"""Long-document question answering over real text: a seeded needle-in-a-haystack generator.

Haystacks are real prose that every install has offline:
- training: the Python language reference and library topics shipped with CPython
  (`pydoc_data.topics`, PSF License 2.0) and the licence texts in samples/corpus/
  (licence-*.txt, see samples/SOURCES.md);
- held out: the Debian Reference chapters in samples/corpus/ (GPL-2+, Osamu Aoki),
  66K tokens, so a held-out 64K-token document never repeats text;
- prose passages for training only (wide_prose_texts): the training haystack plus other
  kinds of text in samples/prose/, all public domain: presidential addresses, Genesis
  (KJV), eight Shakespeare plays.

Needles are short facts overwritten into the haystack's token stream at a line or
sentence boundary, in place (the document keeps its length and every other chunk keeps
its tokens, so training can reuse the compressed haystack chunks and re-encode only the
chunks a needle touches). Kinds:

- `single`: one fact, asked back;
- `multi`: four facts of the same kind about different entities, one asked;
- `spread`: two documents with one fact each, both asked in one question;
- `paraphrase`: a fact stated in other words than its question uses.

The held-out split uses other haystack text, other entities and attributes, other fact
templates and other question phrasings than training (tests check they never overlap).
A sample is a pure function of (split, seed, index, length, kind): same inputs, same tokens.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import zipfile
from dataclasses import dataclass, field
from xml.etree import ElementTree
from pathlib import Path

SPLITS = ("train", "heldout")
KINDS = ("single", "multi", "spread", "paraphrase")
# What an asked value looks like: a number, a code with dashes or letters, a word, a
# person's name, a date. Trained on digits alone the decoder learnt one answer format
# (docs/quality.md); every split has its own words, names and code/date layouts.
VALUE_KINDS = ("digits", "code", "word", "name", "date")
# Kinds of prose question (ctxtree/pipelines/prose.py): written by the base model about the
# passage, a template, or a lookup about something the passage does not say
PROSE_KINDS = ("template", "written", "absent")
# Training and the quality bench read the sample corpus of a source checkout (samples/ is
# not installed): CTXTREE_CORPUS_DIR points elsewhere, e.g. for a non-editable install.
CORPUS_DIR = Path(os.environ.get("CTXTREE_CORPUS_DIR", Path(__file__).resolve().parents[2] / "samples" / "corpus"))


# Other kinds of text, for prose questions only (samples/SOURCES.md): NLTK's data packages as
# they are (State of the Union addresses 1945-2006, eight Shakespeare plays in Jon Bosak's
# XML) and Genesis in the King James version.
PROSE_DIR = Path(os.environ.get("CTXTREE_PROSE_DIR", CORPUS_DIR.parent / "prose"))


def corpus_files(pattern: str) -> list[Path]:
    files = sorted(CORPUS_DIR.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {CORPUS_DIR}: training data come from samples/corpus of a "
                                "ctxtree checkout (set CTXTREE_CORPUS_DIR to use another copy)")
    return files


@dataclass(frozen=True)
class Vocabulary:
    """Everything a needle is made of, per split."""
    colors: tuple[str, ...]
    places: tuple[str, ...]
    attributes: tuple[str, ...]
    facts: tuple[str, ...]          # "{Entity}", "{entity}", "{attr}", "{value}"
    questions: tuple[str, ...]      # one fact asked
    pair_questions: tuple[str, ...]  # two facts asked ("{entity2}")
    paraphrase: tuple[tuple[str, str], ...]  # (fact, question) stated in different words
    # per non-digit value kind: the attributes such a value can be, and what it is drawn from
    kind_attributes: dict = field(default_factory=dict)   # kind -> attributes
    words: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()       # layouts: 9 a digit, A a capital letter, others kept
    date_format: str = "{month} {day}, {year}"
    # share of word and name values made up from syllables instead of drawn from the lists:
    # a list of 40 words is learnt by heart within a few hundred steps (the decoder then
    # answers held-out questions with training words); made-up ones can only be copied
    invented: float = 0.0


# syllables of made-up word and name values ("velomar", "Drisketa"): several tokens each
SYLLABLES = ("ba", "ver", "lo", "mar", "tri", "ska", "nel", "do", "quin", "ra", "fen", "to", "gal", "mu",
             "sor", "ti", "pla", "vek", "ru", "zan", "om", "bre", "ka", "lis", "tho", "ne", "dra", "pe")


def invented_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


TRAIN_VOCAB = Vocabulary(
    colors=("blue", "green", "red", "yellow", "purple", "orange", "black", "white", "silver", "golden"),
    places=("warehouse", "gate", "garage", "library", "harbor", "tower", "bakery", "museum", "factory",
            "station", "bridge", "cabin"),
    attributes=("access code", "serial number", "room number", "ticket number", "account number", "pin"),
    facts=("The {attr} of {entity} is {value}.",
           "Remember that the {attr} of {entity} is {value}.",
           "{Entity} has the {attr} {value}.",
           "Important: the {attr} for {entity} is {value}."),
    questions=("What is the {attr} of {entity}?",
               "Tell me the {attr} of {entity}.",
               "What {attr} does {entity} have?",
               "Which {attr} was given for {entity}?"),
    pair_questions=("What are the {attr} of {entity} and the {attr2} of {entity2}?",
                    "Give the {attr} of {entity} and the {attr2} of {entity2}."),
    paraphrase=(("{Entity} can be unlocked by typing {value}.", "Which number opens {entity}?"),
                ("Visitors reach {entity} by dialing extension {value}.", "What do you dial to reach {entity}?"),
                ("The lottery drew {value} for {entity}.", "Which draw result went to {entity}?")),
    kind_attributes={
        "code": ("door code", "reference code", "booking code", "tracking code"),
        "word": ("password", "code word", "secret word", "nickname"),
        "name": ("owner", "caretaker", "manager", "architect"),
        "date": ("opening date", "inspection date", "founding date"),
    },
    words=("falcon", "lantern", "harvest", "marble", "whisper", "cobalt", "meadow", "thunder", "pepper",
           "glacier", "velvet", "compass", "orchid", "saddle", "ember", "willow", "anchor", "biscuit",
           "canyon", "dolphin", "feather", "garnet", "hazel", "island", "jasmine", "kettle", "lemon",
           "mango", "nectar", "otter", "pebble", "quartz", "raven", "sparrow", "tulip", "walnut", "zebra",
           "puzzle", "rocket", "button", "candle", "dragon", "forest", "galaxy", "hammer", "jungle", "koala"),
    names=("Alvarez", "Brennan", "Castillo", "Dubois", "Eriksen", "Fischer", "Gallagher", "Hoffman",
           "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn",
           "Rossi", "Schneider", "Tanaka", "Underwood", "Vasquez", "Whitaker", "Yamamoto", "Zimmerman",
           "Harper", "Sullivan", "Novak", "Ferreira", "Larsen", "Mbeki", "Costa", "Dalton", "Keller"),
    codes=("99-99-99", "999-999", "AA-9999", "9999-AA", "A99-999", "AAA-99"),
    date_format="{month} {day}, {year}",
    invented=0.5,
)

HELDOUT_VOCAB = Vocabulary(
    colors=("amber", "crimson", "ivory", "teal", "violet", "scarlet", "bronze", "indigo"),
    places=("observatory", "greenhouse", "lighthouse", "monastery", "vineyard", "laboratory", "stadium",
            "boathouse", "chapel", "quarry"),
    attributes=("locker combination", "order number", "badge number", "invoice number", "parcel number"),
    facts=("According to the records, {entity} has {attr} {value}.",
           "Note: the {attr} assigned to {entity} is {value}.",
           "For {entity}, the {attr} reads {value}."),
    questions=("Which {attr} belongs to {entity}?",
               "Do you know the {attr} of {entity}?",
               "Find the {attr} recorded for {entity}."),
    pair_questions=("Which {attr} belongs to {entity}, and which {attr2} to {entity2}?",),
    paraphrase=(("Whoever wants to enter {entity} must key in {value}.", "What must be keyed in to enter {entity}?"),
                ("{Entity} was sold to the bidder holding card {value}.", "Which card won {entity}?")),
    kind_attributes={
        "code": ("gate code", "voucher code", "permit code"),
        "word": ("passphrase", "watchword", "call sign"),
        "name": ("landlord", "curator", "warden"),
        "date": ("renewal date", "delivery date"),
    },
    words=("juniper", "cinnamon", "basalt", "heron", "tangerine", "lilac", "mosaic", "nutmeg", "obsidian",
           "parsley", "quiver", "saffron", "trumpet", "umbrella", "vortex", "wagon", "yarrow", "acorn",
           "badger", "cactus", "daisy", "emerald", "fjord", "gecko", "hyacinth", "igloo", "jaguar"),
    names=("Abernathy", "Bergstrom", "Chowdhury", "Delacroix", "Esposito", "Fontaine", "Grimaldi",
           "Haugen", "Iglesias", "Jablonski", "Kaminski", "Lombardi", "Mancini", "Nordberg", "Oyelaran",
           "Pellegrini", "Rasmussen", "Szabo", "Thornton", "Valdivia", "Wojcik", "Ybarra"),
    codes=("99-9999-9", "A9A-999"),
    date_format="{day} {month} {year}",
)

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def vocabulary(split: str) -> Vocabulary:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; expected one of {SPLITS}")
    return TRAIN_VOCAB if split == "train" else HELDOUT_VOCAB


def haystack_texts(split: str) -> list[tuple[str, str]]:
    """(name, text) of the split's haystack documents, in a fixed order."""
    if split == "train":
        import pydoc_data.topics

        texts = [(f"pydoc:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
        texts += [(p.name, p.read_text()) for p in corpus_files("license-*.txt")]
        return texts
    if split == "heldout":
        return [(p.name, p.read_text()) for p in corpus_files("debian-reference-*.txt")]
    raise ValueError(f"split {split!r} unknown; expected one of {SPLITS}")


def play_text(xml: str) -> str:
    """A play in Bosak's XML as plain text: titles, the persons of the play, stage
    directions, and each speech as "SPEAKER:" and its lines."""
    out: list[str] = []

    def walk(el) -> None:
        if el.tag == "SPEECH":  # its stage directions stay inside its lines
            speakers = " and ".join(s.text.strip() for s in el.findall("SPEAKER") if s.text)
            lines = [" ".join("".join(line.itertext()).split()) for line in el.findall("LINE")]
            out.append(f"{speakers}:\n" + "\n".join(lines) + "\n")
        elif el.tag in ("TITLE", "SUBTITLE", "PERSONA", "GRPDESCR", "SCNDESCR", "PLAYSUBT", "STAGEDIR"):
            out.append(" ".join("".join(el.itertext()).split()))
        elif el.tag != "FM":  # front matter: the markup's credits
            for child in el:
                walk(child)

    walk(ElementTree.fromstring(xml))
    return "\n".join(out)


def wide_prose_texts() -> list[tuple[str, str]]:
    """(name, text) of the passages training asks prose questions about when they are not
    only the lookup haystack (TrainConfig.prose_passages "wide"): the training haystack,
    then 65 State of the Union addresses, Genesis and eight plays. Training only: held-out
    prose stays on the Debian Reference (another source, another kind of text)."""
    texts = haystack_texts("train")
    with zipfile.ZipFile(PROSE_DIR / "state_union.zip") as z:
        texts += [(f"state_union:{Path(n).stem}", z.read(n).decode("latin-1"))
                  for n in sorted(z.namelist()) if n.endswith(".txt")]
    texts.append(("genesis-kjv", (PROSE_DIR / "genesis-kjv.txt").read_text()))
    with zipfile.ZipFile(PROSE_DIR / "shakespeare.zip") as z:
        texts += [(f"shakespeare:{Path(n).stem}", play_text(z.read(n).decode()))
                  for n in sorted(z.namelist()) if n.endswith(".xml")]
    return texts


@dataclass
class Haystack:
    """One split's haystack text as a single token stream, with the positions where a
    needle may start (right after a newline or sentence end). label: what its chunks are
    called in the training chunk cache (default: the split)."""
    split: str
    tokens: list[int]
    boundaries: list[int]
    names: list[str]
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.split

    def __len__(self) -> int:
        return len(self.tokens)


def load_haystack(tokenizer, split: str, texts: list[tuple[str, str]] | None = None, label: str = "") -> Haystack:
    """The split's haystack (haystack_texts), or these texts under this split's vocabulary
    and a label of their own (wide_prose_texts)."""
    tokens: list[int] = []
    names = []
    for name, text in texts if texts is not None else haystack_texts(split):
        text = re.sub(r"\n{3,}", "\n\n", text.strip()) + "\n\n"
        tokens += tokenizer(text, add_special_tokens=False)["input_ids"]
        names.append(name)
    boundary_ids = {i for t, i in tokenizer.get_vocab().items()
                    if t.endswith(("Ċ", ".")) or t in ("ĊĊ", ".Ġ")}
    boundaries = [i + 1 for i, t in enumerate(tokens[:-1]) if t in boundary_ids]
    return Haystack(split=split, tokens=tokens, boundaries=boundaries, names=names, label=label)


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str
    sentence: str
    document: int


@dataclass
class Sample:
    """One question over one or more documents (token ids, each `length // n_docs` long)."""
    id: str
    split: str
    kind: str
    length: int
    documents: list[list[int]]
    question: str
    answers: list[str]          # every value must appear in a correct answer
    target: str                 # the answer text the decoder is trained to give
    facts: list[Fact] = field(default_factory=list)
    needle_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (document, start, end)
    answer_positions: list[tuple[int, int]] = field(default_factory=list)  # asked values: (document, token)
    haystack_starts: list[int] = field(default_factory=list)  # where each document starts in the haystack

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(d) for d in self.documents]


def value_found(value: str, answer: str) -> bool:
    """A number must appear as a whole number (48213 is not in 482139); anything else
    (a code, word, name or date) as whole words, case and spacing ignored."""
    if value.isdigit():
        return value in set(re.findall(r"\d+", answer))
    norm = " ".join(answer.split()).lower()
    return re.search(r"(?<![\w-])" + re.escape(" ".join(value.split()).lower()) + r"(?![\w-])", norm) is not None


def numbers_only(answer: str) -> bool:
    """An answer with no word in it ("207", "2007.", "12-34"): what a decoder that only
    learnt to copy values says to every question."""
    return re.search(r"[^\W\d_]", answer) is None


def is_correct(answer: str, sample: Sample) -> bool:
    """Exact match: every expected value appears in the answer (value_found)."""
    return all(value_found(v, answer) for v in sample.answers)


def _rng(split: str, seed: int, index: int, length: int, kind: str) -> random.Random:
    key = f"{split}:{seed}:{index}:{length}:{kind}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _value(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _kind_value(rng: random.Random, vocab: Vocabulary, kind: str, digits: tuple[int, int]) -> str:
    """A value of `kind` (VALUE_KINDS) from the split's vocabulary."""
    if kind == "digits":
        return _value(rng, rng.randint(*digits))
    if kind == "code":
        layout = rng.choice(vocab.codes)
        return "".join(str(rng.randrange(10)) if c == "9" else chr(65 + rng.randrange(26)) if c == "A" else c
                       for c in layout)
    if kind in ("word", "name"):
        # no draw where nothing is invented: the held-out streams stay what they were
        if vocab.invented > 0 and rng.random() < vocab.invented:
            word = invented_word(rng)
            return word if kind == "word" else word.capitalize()
        return rng.choice(vocab.words if kind == "word" else vocab.names)
    if kind == "date":
        return vocab.date_format.format(month=rng.choice(MONTHS), day=rng.randint(1, 28),
                                        year=rng.randint(1950, 2030))
    raise ValueError(f"value kind {kind!r} unknown; expected one of {VALUE_KINDS}")


def check_value_kinds(kinds: tuple[str, ...]) -> None:
    if not kinds or any(k not in VALUE_KINDS for k in kinds):
        raise ValueError(f"value kinds {kinds!r}: expected one or more of {VALUE_KINDS}")


def _entities(rng: random.Random, vocab: Vocabulary, n: int) -> list[str]:
    pairs = rng.sample([(c, p) for c in vocab.colors for p in vocab.places], n)
    return [f"the {c} {p}" for c, p in pairs]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_sample(tokenizer, haystack: Haystack, index: int, length: int, kind: str, seed: int = 0,
                digits: int | tuple[int, int] = (4, 6), align: int = 1, values: str = "digits") -> Sample:
    """Sample `index` of the stream for (split, seed, length, kind). Deterministic.

    length: total document tokens (split over two documents for `spread`); digits: the
    answer values' digit count, or an inclusive range to draw from (curriculum: short first);
    align: documents start at a multiple of this in the haystack (training uses the chunk
    length, so haystack chunks repeat and their trees can be cached); values: what the
    asked values look like (VALUE_KINDS; paraphrase needles state numbers only).
    """
    if kind not in KINDS:
        raise ValueError(f"needle kind {kind!r} unknown; expected one of {KINDS}")
    check_value_kinds((values,))
    if kind == "paraphrase" and values != "digits":
        raise ValueError("paraphrase needles state numbers: use values='digits'")
    n_docs = 2 if kind == "spread" else 1
    doc_len = length // n_docs
    if doc_len < 64:
        raise ValueError(f"length {length} is too short for a {kind} sample (at least 64 tokens per document)")
    if doc_len > len(haystack):
        raise ValueError(f"length {length} exceeds the {haystack.split} haystack ({len(haystack)} tokens)")
    split = haystack.split
    vocab = vocabulary(split)
    rng = _rng(split, seed, index, length, kind)
    lo, hi = (digits, digits) if isinstance(digits, int) else digits

    n_facts = {"single": 1, "paraphrase": 1, "multi": 4, "spread": 2}[kind]
    entities = _entities(rng, vocab, n_facts)
    value_kind = values
    attr = rng.choice(vocab.attributes if value_kind == "digits" else vocab.kind_attributes[value_kind])
    values: list[str] = []
    while len(values) < n_facts:  # distinct values: a question never has two right answers
        v = _kind_value(rng, vocab, value_kind, (lo, hi))
        if v not in values:
            values.append(v)
    if kind == "paraphrase":
        fact_t, question_t = rng.choice(vocab.paraphrase)
        sentences = [fact_t.format(Entity=_cap(entities[0]), entity=entities[0], value=values[0])]
        question = question_t.format(entity=entities[0])
    else:
        sentences = [rng.choice(vocab.facts).format(Entity=_cap(e), entity=e, attr=attr, value=v)
                     for e, v in zip(entities, values)]
        if kind == "spread":
            question = rng.choice(vocab.pair_questions).format(attr=attr, attr2=attr, entity=entities[0],
                                                                 entity2=entities[1])
        else:
            question = rng.choice(vocab.questions).format(attr=attr, entity=entities[0])
    asked = [0, 1] if kind == "spread" else [0]
    # multi: the asked fact sits at a random rank among the four
    order = list(range(n_facts))
    rng.shuffle(order)

    documents, starts = [], []
    for _ in range(n_docs):
        start = rng.randrange((len(haystack) - doc_len) // align + 1) * align
        documents.append(list(haystack.tokens[start:start + doc_len]))
        starts.append(start)
    facts, spans, value_at = [], [], {}
    per_doc: list[list[int]] = [[] for _ in range(n_docs)]
    for rank, f in enumerate(order):
        per_doc[f if kind == "spread" else 0].append(f)
    for d, fact_ids in enumerate(per_doc):
        needle_tokens = [tokenizer(" " + sentences[f] + "\n", add_special_tokens=False)["input_ids"]
                         for f in fact_ids]
        need = sum(len(t) for t in needle_tokens)
        if need * 2 > doc_len:
            raise ValueError(f"documents of {doc_len} tokens are too short for {len(fact_ids)} facts")
        # non-overlapping slots: split the document into len(fact_ids) equal regions, one fact each
        region = doc_len // len(fact_ids)
        lo_bound = starts[d]
        cands = haystack.boundaries
        for slot, (f, toks) in enumerate(zip(fact_ids, needle_tokens)):
            r0, r1 = slot * region, (slot + 1) * region - len(toks)
            # prefer a sentence/line boundary inside the region (positions relative to the document)
            inside = [b - lo_bound for b in _range(cands, lo_bound + r0, lo_bound + r1)]
            pos = rng.choice(inside) if inside else rng.randrange(r0, max(r0, r1) + 1)
            documents[d][pos:pos + len(toks)] = toks
            spans.append((d, pos, pos + len(toks)))
            value_at[f] = (d, pos + _value_token(tokenizer, sentences[f], values[f]))
            facts.append(Fact(entity=entities[f], attribute=attr, value=values[f], sentence=sentences[f],
                              document=d))
    answers = [values[i] for i in asked]
    target = " and ".join(answers)
    return Sample(id=f"{split}-{kind}-{length}-{seed}-{index}", split=split, kind=kind, length=length,
                  documents=documents, question=question, answers=answers, target=target,
                  facts=facts, needle_spans=spans, answer_positions=[value_at[i] for i in asked],
                  haystack_starts=starts)


def _value_token(tokenizer, sentence: str, value: str) -> int:
    """Index of the first token of `value` in the tokens of " " + sentence + "\n" (the value
    ends every template: rindex, since "ember" is in "Remember"; a word's leading space
    is part of its token, a digit's is not)."""
    at = 1 + sentence.rindex(value)
    offsets = tokenizer(" " + sentence + "\n", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return next(i for i, (_, end) in enumerate(offsets) if end > at)


def _range(sorted_positions: list[int], lo: int, hi: int) -> list[int]:
    """Elements of a sorted list within [lo, hi]."""
    import bisect

    return sorted_positions[bisect.bisect_left(sorted_positions, lo):bisect.bisect_right(sorted_positions, hi)]


@dataclass
class NeedleChunk:
    """One haystack chunk with several facts overwritten into it, and a question per fact:
    the unit of training data (encoded once, asked many times)."""
    tokens: list[int]
    facts: list[Fact]
    questions: list[str]
    value_positions: list[int]   # per fact: the token position of its value's first token


def make_needle_chunk(tokenizer, haystack: Haystack, index: int, seed: int, chunk_len: int, n_facts: int = 4,
                      digits: tuple[int, int] = (2, 6), value_kinds: tuple[str, ...] = ("digits",)) -> NeedleChunk:
    """Needle chunk `index`: a chunk-aligned haystack window with n_facts facts, each stated
    with a plain or (numbers) a paraphrase template of the split; each value of a kind drawn
    from value_kinds (numbers of `digits` digits)."""
    check_value_kinds(value_kinds)
    vocab = vocabulary(haystack.split)
    rng = _rng(haystack.split, seed, index, chunk_len, "chunk")
    n_windows = len(haystack) // chunk_len
    start = rng.randrange(n_windows) * chunk_len
    tokens = list(haystack.tokens[start:start + chunk_len])
    entities = _entities(rng, vocab, n_facts)
    # one draw per fact only when there is a choice: digits-only chunks stay as they were
    kinds = [rng.choice(value_kinds) if len(value_kinds) > 1 else value_kinds[0] for _ in range(n_facts)]
    values: list[str] = []
    while len(values) < n_facts:
        v = _kind_value(rng, vocab, kinds[len(values)], digits)
        if v not in values:
            values.append(v)
    facts, questions, value_positions = [], [], []
    region = chunk_len // n_facts
    for slot, (entity, value, value_kind) in enumerate(zip(entities, values, kinds)):
        if value_kind != "digits":
            attr = rng.choice(vocab.kind_attributes[value_kind])
            sentence = rng.choice(vocab.facts).format(Entity=_cap(entity), entity=entity, attr=attr, value=value)
            question = rng.choice(vocab.questions).format(attr=attr, entity=entity)
        elif rng.random() < 0.25:
            fact_t, question_t = rng.choice(vocab.paraphrase)
            attr = ""
            sentence = fact_t.format(Entity=_cap(entity), entity=entity, value=value)
            question = question_t.format(entity=entity)
        else:
            attr = rng.choice(vocab.attributes)
            sentence = rng.choice(vocab.facts).format(Entity=_cap(entity), entity=entity, attr=attr, value=value)
            question = rng.choice(vocab.questions).format(attr=attr, entity=entity)
        toks = tokenizer(" " + sentence + "\n", add_special_tokens=False)["input_ids"]
        r0, r1 = slot * region, (slot + 1) * region - len(toks)
        inside = [b - start for b in _range(haystack.boundaries, start + r0, start + r1)]
        pos = rng.choice(inside) if inside else rng.randrange(r0, max(r0, r1) + 1)
        tokens[pos:pos + len(toks)] = toks
        value_positions.append(pos + _value_token(tokenizer, sentence, value))
        facts.append(Fact(entity=entity, attribute=attr, value=value, sentence=sentence, document=0))
        questions.append(question)
    return NeedleChunk(tokens=tokens, facts=facts, questions=questions, value_positions=value_positions)


def absent_question(rng: random.Random, split: str) -> str:
    """A lookup question about a colour-place entity drawn afresh: asked over a passage that
    does not hold the answer, it teaches the decoder what the base model does with the
    passage in its prompt. (Over a needle passage the entity can, rarely, be one the
    passage states: 4 of the training split's 120 pairs, about 1 in 30.)"""
    vocab = vocabulary(split)
    kind = rng.choice(VALUE_KINDS)
    attr = rng.choice(vocab.attributes if kind == "digits" else vocab.kind_attributes[kind])
    return rng.choice(vocab.questions).format(attr=attr, entity=_entities(rng, vocab, 1)[0])


def pair_question(rng: random.Random, split: str, a: Fact, b: Fact, question_a: str, question_b: str) -> str:
    """One question asking two facts (of any attributes)."""
    vocab = vocabulary(split)
    if a.attribute and b.attribute:
        return rng.choice(vocab.pair_questions).format(attr=a.attribute, attr2=b.attribute,
                                                       entity=a.entity, entity2=b.entity)
    return f"{question_a} And: {question_b[:1].lower() + question_b[1:]}"

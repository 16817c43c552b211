"""One training step of the injection weights (method.md §6), framework-free.

Objective, per example, given the chat prompt of the question and the injected nodes of
the example's documents, at every answer position (answer + end of turn):
- distillation, where the example carries a teacher (prose questions): KL(teacher ||
  student) over the teacher's top-k tokens (ctxtree/pipelines/teacher.py), the teacher's
  probabilities renormalised over those k, the student's over the whole vocabulary;
- cross-entropy on the gold answer, for lookups (the value is known exactly).
Each is a mean over the example's answer positions, and every example weighs the same.
The compressor and the base model are frozen; the routing query is the question's last
token, never an answer token, exactly as at serving time (ctxtree/answer.py).

Lookups are not distilled: the base model with the passage in its prompt answers a
lookup in a sentence ("The badge number of ... is 48213."), so its distribution at the
first answer position puts its mass on "The" while the gold answer starts with the
value; a teacher pass per fresh needle (1.5 s here) would also double the cost of a step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ctxtree.prompt import question_prompt, question_tokens, value_tokens
from ctxtree.kernels.compressor import query_vector, route_query
from ctxtree.kernels.generate import left_pad
from ctxtree.kernels.inject import InjectionDecoder, batch_context
from ctxtree.kernels.tree import ContextTree, node_spans, search_documents
from ctxtree.pipelines.chunk_pool import ChunkPool, assemble_index, assemble_selected
from ctxtree.pipelines.data import pair_question
from ctxtree.pipelines.prose import ProseExample, prose_tree
from ctxtree.pipelines.teacher import TeacherAnswer


@dataclass
class Example:
    trees: list[ContextTree]   # one per document, in request order
    question: str
    target: str                # e.g. "48213" or "48213 and 907"
    # per document: (chunk, token offset in that chunk) of an answer value, or None
    answer_at: list[tuple[int, int] | None] | None = None
    oracle: bool = False       # route to the answer's nodes instead of searching
    teacher: TeacherAnswer | None = None   # distil: train on teacher.tokens towards its top-k
    # per document, its single-chunk trees when `trees` are search indexes without K/V
    # (chunk_pool.assemble_index): the K/V of the chunks search keeps are joined then
    parts: list[list[ContextTree]] | None = None


@dataclass
class StepResult:
    loss: Tensor               # mean over examples of the mean over their answer tokens (has grad)
    tokens: int
    correct_tokens: int        # teacher-forced argmax hits
    exact: int                 # rows whose every answer token is the argmax
    kl: list[float] = field(default_factory=list)   # per distilled example: mean KL(teacher || student), nats


def kl_to_teacher(logits: Tensor, top_ids: Tensor, top_logp: Tensor) -> Tensor:
    """Per position KL(teacher || student) over the teacher's top-k: logits [N,V] (student),
    top_ids/top_logp [N,k] (teacher) -> [N]. The teacher's k probabilities are renormalised
    to sum to 1; the student's are its full-vocabulary softmax (mass it puts elsewhere is
    penalised through the smaller log-probabilities of the teacher's tokens)."""
    student = torch.log_softmax(logits.float(), dim=-1).gather(-1, top_ids.long())  # [N,k]
    teacher = torch.log_softmax(top_logp.float(), dim=-1)                            # [N,k]
    return (teacher.exp() * (teacher - student)).sum(-1)


def curriculum_chunks(step: int, max_chunks: int, ramp_steps: int) -> int:
    """Most chunks per document at `step`: 1 at the start, max_chunks after ramp_steps."""
    if ramp_steps <= 0:
        return max_chunks
    return min(max_chunks, 1 + (max_chunks - 1) * step // ramp_steps)


def make_example(pool: ChunkPool, rng: random.Random, pool_size: int, max_chunks: int,
                 spread_fraction: float, oracle_fraction: float = 0.0, serial: int = 0,
                 prose: list[ProseExample] | None = None, prose_fraction: float = 0.0,
                 prose_pool: ChunkPool | None = None) -> Example:
    """A training question: a needle chunk among haystack chunks, one of its facts asked; or
    (spread) two documents with a needle chunk each and both facts asked at once; or
    (prose_fraction of them) a question about one passage with the base model's own answer.

    pool_size 0 means fresh needles: example number `serial` asks fact serial % F of needle
    chunk serial // F (F facts per chunk), so no fact is ever asked twice and nothing can
    be learnt by heart (a small pool is memorised within a few hundred steps)."""
    n_hay = pool.n_haystack_chunks
    if prose and prose_fraction > 0 and rng.random() < prose_fraction:
        # one-chunk documents: the answer is about this passage, so search must keep it
        p = prose[rng.randrange(len(prose))]
        return Example(trees=[prose_tree(prose_pool or pool, p)], question=p.question, target=p.answer,
                       teacher=p.teacher)

    def document(needle: ContextTree, n_chunks: int) -> tuple[ContextTree, list[ContextTree], int]:
        chunks = [pool.haystack_chunk(rng.randrange(n_hay)) for _ in range(n_chunks - 1)]
        at = rng.randrange(n_chunks)
        chunks.insert(at, needle)
        return assemble_index(chunks), chunks, at

    oracle = rng.random() < oracle_fraction
    if rng.random() < spread_fraction:
        (ta, fa, qa, pa), (tb, fb, qb, pb) = (pool.needle_chunk(k) for k in rng.sample(range(pool_size), 2))
        ia, ib = rng.randrange(len(fa)), rng.randrange(len(fb))
        per_doc = max(1, max_chunks // 2)
        (da, chunks_a, ca), (db, chunks_b, cb) = (document(ta, rng.randint(1, per_doc)),
                                                    document(tb, rng.randint(1, per_doc)))
        question = pair_question(rng, pool.haystack.split, fa[ia], fb[ib], qa[ia], qb[ib])
        return Example(trees=[da, db], question=question, target=f"{fa[ia].value} and {fb[ib].value}",
                       answer_at=[(ca, pa[ia]), (cb, pb[ib])], oracle=oracle, parts=[chunks_a, chunks_b])
    if pool_size == 0:
        tree, facts, questions, positions = pool.needle_chunk(serial // pool.facts_per_chunk)
        i = serial % pool.facts_per_chunk
    else:
        tree, facts, questions, positions = pool.needle_chunk(rng.randrange(pool_size))
        i = rng.randrange(len(facts))
    doc, parts, c = document(tree, rng.randint(1, max_chunks))
    return Example(trees=[doc], question=questions[i], target=facts[i].value, answer_at=[(c, positions[i])],
                   oracle=oracle, parts=[parts])


def route_to(selection: Tensor, tree: ContextTree, chunk: int, offset: int) -> Tensor:
    """`selection` [C, h+1] with chunk `chunk`'s path replaced by the one that descends to
    token `offset`: the answer then sits in a finest-level node (oracle routing), and the
    chunk is injected even where chunk selection left it out."""
    spans = node_spans(tree.chunk_lengths[chunk], tree.config.height)
    node, path = 0, []
    for _ in range(1, tree.config.height):
        left, right = 2 * node + 1, 2 * node + 2
        go_left = offset < spans[left][1]
        path.append(right if go_left else left)
        node = left if go_left else right
    path += [2 * node + 1, 2 * node + 2]
    out = selection.clone()
    out[chunk] = torch.tensor(path)
    return out


def answer_step(decoder: InjectionDecoder, tokenizer, end_id: int, examples: list[Example],
                policy: str = "query") -> StepResult:
    """Teacher-forced loss on the answer tokens of a batch of examples, searched as at
    serving time (decoder.top_chunks chunks kept)."""
    model = decoder.base
    rows, query_at, n_answer = [], [], []
    for ex in examples:
        prompt, q = question_prompt(tokenizer, ex.question)
        answer = list(ex.teacher.tokens) if ex.teacher is not None else value_tokens(tokenizer, ex.target) + [end_id]
        rows.append(prompt + answer)
        query_at.append(q)
        n_answer.append(len(answer))
    batch = left_pad(rows, device=model.device)
    t = batch.input_ids.shape[1]
    query_index = torch.tensor([q + t - len(r) for q, r in zip(query_at, rows)])
    # routing queries see the question only: the answer is to the right of query_index and
    # attention is causal, so running the whole row gives the same h0 there
    with torch.no_grad():
        queries = query_vector(model, batch.input_ids, batch.positions, batch.token_valid, query_index)  # [B,D]
    per_request = []
    for row, ex in enumerate(examples):
        route = route_query(model, queries[row], question_tokens(tokenizer, ex.question))
        selections = search_documents(ex.trees, route, policy, decoder.top_chunks)
        if ex.oracle and ex.answer_at:
            selections = [sel if at is None else route_to(sel, tree, *at)
                          for sel, tree, at in zip(selections, ex.trees, ex.answer_at)]
        trees = ex.trees
        if ex.parts is not None:  # search indexes: join the K/V of the kept chunks only
            trees, selections = map(list, zip(*(assemble_selected(p, sel) for p, sel in zip(ex.parts, selections))))
        per_request.append(decoder.request_kv(trees, selections))
    context = batch_context(per_request)
    h = decoder.hidden_states(batch.input_ids, batch.positions, batch.token_valid, None, context)  # [B,T,D]
    # logits only where an answer token is predicted (the LM head is a fifth of the model):
    # row b's answer positions, padded to the longest answer by repeating its last one
    longest = max(n_answer)
    pred_pos = torch.stack([torch.arange(t - n - 1, t - 1)[torch.arange(longest).clamp(max=n - 1)]
                            for n in n_answer])  # [B,A]
    answer_mask = torch.stack([torch.arange(longest) < n for n in n_answer])  # [B,A]
    rows_idx = torch.arange(len(examples))[:, None].expand_as(pred_pos)
    logits = decoder.logits(h[rows_idx, pred_pos], context)[answer_mask]  # [N,V]
    labels = batch.input_ids[rows_idx, pred_pos + 1][answer_mask]  # [N]
    # every example weighs the same, however long its answer: a 40-token prose answer
    # must not outweigh ten 4-token values
    per_row_logits = torch.split(logits, n_answer)
    per_row_labels = torch.split(labels, n_answer)
    losses, kls = [], []
    for ex, lg, lb in zip(examples, per_row_logits, per_row_labels):
        if ex.teacher is not None:
            kl = kl_to_teacher(lg, ex.teacher.top_ids.to(lg.device), ex.teacher.top_logp.to(lg.device)).mean()
            kls.append(float(kl.detach()))
            losses.append(kl)
        else:
            losses.append(F.cross_entropy(lg, lb))
    loss = torch.stack(losses).mean()
    hits = (logits.argmax(-1) == labels).cpu()
    per_row = torch.split(hits, n_answer)
    return StepResult(loss=loss, tokens=len(labels), correct_tokens=int(hits.sum()),
                      exact=sum(int(r.all()) for r in per_row), kl=kls)


@torch.no_grad()
def information_recovered(decoder: InjectionDecoder, base: InjectionDecoder, tokenizer, end_id: int,
                          examples: list[Example], batch: int = 4) -> dict:
    """How much of what the text tells the teacher the student gets from the trees:
    1 - KL(teacher || student) / KL(teacher || base model without the text), each KL a mean
    over the examples' answer positions then over examples (examples with a teacher).
    1: the trees are as good as the text; 0: no better than no document at all."""
    def mean_kl(dec: InjectionDecoder) -> float:
        kls = []
        for i in range(0, len(examples), batch):
            kls += answer_step(dec, tokenizer, end_id, examples[i:i + batch]).kl
        return sum(kls) / len(kls)

    student, blind = mean_kl(decoder), mean_kl(base)
    return {"kl_student": student, "kl_base": blind, "recovered": 1 - student / blind}


# ---- optimizer state as safetensors (checkpoints are never pickled) --------------------

def save_optimizer(opt: torch.optim.AdamW, names: list[str], path) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    tensors = {}
    for name, p in zip(names, params):
        state = opt.state.get(p)
        if state:
            tensors[f"{name}.exp_avg"] = state["exp_avg"].contiguous()
            tensors[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
            tensors[f"{name}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(path))


def load_optimizer(opt: torch.optim.AdamW, names: list[str], path) -> None:
    tensors = load_file(str(path))
    params = [p for group in opt.param_groups for p in group["params"]]
    for name, p in zip(names, params):
        if f"{name}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"{name}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(p.device),
                            "step": tensors[f"{name}.step"].reshape(()).clone()}

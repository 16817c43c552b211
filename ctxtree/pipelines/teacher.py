"""The teacher of distillation: the frozen base model with the passage's *text* in its prompt.

The student (the injection decoder, given the passage's tree instead of its text) is
trained to match the teacher's next-token distribution at every position of the
teacher's own answer: KL(teacher || student) over the teacher's top-k tokens
(ctxtree/pipelines/train_step.py). The teacher never changes while the student
trains, so its answer and its top-k are computed once, here, and cached with the
examples (ctxtree/pipelines/prose.py).

The teacher runs in bfloat16: 1.7x faster than fp32 here (8 prompts of 330 tokens:
2.3 s vs 3.9 s), and an answer is generated once and stored, never recomputed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ctxtree.kernels.generate import decode_step, left_pad, prefill
from ctxtree.kernels.inject import InjectionDecoder
from ctxtree.kernels.llama import KVCache, Llama

TOP_K = 32          # teacher probabilities kept per answer position
FILL_LOGP = -1e4    # log-probability of a padding slot in a top-k row (probability 0, never NaN)


@dataclass
class TeacherAnswer:
    tokens: list[int]      # the answer, end of turn included: what the student is trained on
    top_ids: Tensor        # [n, k] int32: the teacher's k most likely tokens at each answer position
    top_logp: Tensor       # [n, k] float32: their log-probabilities (full softmax, not renormalised)

    def __post_init__(self) -> None:
        if self.top_ids.shape != self.top_logp.shape or self.top_ids.shape[0] != len(self.tokens):
            raise ValueError(f"teacher targets {tuple(self.top_ids.shape)} do not fit {len(self.tokens)} answer tokens")


def teacher_model(model: Llama) -> Llama:
    """A bfloat16 copy of the frozen base model (the teacher)."""
    return copy.deepcopy(model).to(torch.bfloat16).eval()


@torch.no_grad()
def teach(teacher: Llama, prompts: list[list[int]], stop_ids: tuple[int, ...], max_tokens: int,
          k: int = TOP_K, batch: int = 8) -> list[tuple[list[int], Tensor, Tensor, bool]]:
    """Greedy answers of the teacher to each prompt, with its top-k log-probabilities at
    every answer position: (tokens, top_ids [n,k], top_logp [n,k], stopped on its own).
    A stopped answer's tokens end with the stop token."""
    decoder = InjectionDecoder(teacher, 1).eval()  # no context: exactly the base model
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    out = []
    for i in range(0, len(prompts), batch):
        rows = prompts[i:i + batch]
        padded = left_pad(rows, device=teacher.device)
        b, t = padded.input_ids.shape
        cache = KVCache.allocate(teacher.cfg, b, t + max_tokens, teacher.dtype, teacher.device)
        logits = prefill(decoder, padded, cache, None)  # [B,V]
        positions = padded.lengths.clone()
        tokens: list[list[int]] = [[] for _ in rows]
        ids: list[list[Tensor]] = [[] for _ in rows]
        logps: list[list[Tensor]] = [[] for _ in rows]
        done = torch.zeros(b, dtype=torch.bool)
        stopped = [False] * b
        for step in range(max_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = logp.topk(k, dim=-1)
            nxt = logits.argmax(-1)
            for r in range(b):
                if not done[r]:
                    tokens[r].append(int(nxt[r]))
                    ids[r].append(top.indices[r].to(torch.int32).cpu())  # kept on the CPU: cached, then batched
                    logps[r].append(top.values[r].cpu())
                    stopped[r] = int(nxt[r]) in stop_ids
            done |= torch.isin(nxt.cpu(), stops)
            if bool(done.all()) or step == max_tokens - 1:
                break
            logits = decode_step(decoder, nxt, positions, cache, None)
            positions += 1
        out += [(tokens[r], torch.stack(ids[r]), torch.stack(logps[r]), stopped[r]) for r in range(b)]
    return out


def ended_after(tokens: list[int], top_ids: Tensor, top_logp: Tensor, n: int, end_id: int) -> TeacherAnswer:
    """The answer's first n positions, then end_id with a certain target (its top-k row has
    all its mass on end_id): the student must learn to end there, whatever the teacher did."""
    k = top_ids.shape[1]
    end_ids = torch.full((1, k), end_id, dtype=torch.int32)
    end_logp = torch.full((1, k), FILL_LOGP)
    end_logp[0, 0] = 0.0
    return TeacherAnswer(tokens=tokens[:n] + [end_id], top_ids=torch.cat([top_ids[:n], end_ids]),
                         top_logp=torch.cat([top_logp[:n], end_logp]))


def whole_sentences(tokenizer, tokens: list[int], top_ids: Tensor, top_logp: Tensor,
                    end_id: int) -> TeacherAnswer | None:
    """An answer cut off at max_tokens, ended at its last full sentence followed by `end_id`
    (whose target is certain: the teacher would have gone on, the student must not learn to
    cut off); None when it holds no full sentence."""
    last = None
    for n in range(len(tokens), 0, -1):
        if re.search(r"(?<!\d)[.!?][\"')\]]?\s*$", tokenizer.decode(tokens[:n])):  # not "3." of "3.5"
            last = n
            break
    if last is None:
        return None
    return ended_after(tokens, top_ids, top_logp, last, end_id)

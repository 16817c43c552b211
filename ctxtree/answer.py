"""Answering a question over documents whose context trees are at hand.

question -> prompt -> query vector (layer 0, no injection) -> search every tree ->
injected K/V -> prefill + decode. Used by `ctxtree ask`, and later by the endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ctxtree.detok import TextStream
from ctxtree.prompt import question_prompt, question_tokens
from ctxtree.runtime import Runtime
from ctxtree.kernels.compressor import query_vector, route_query
from ctxtree.kernels.generate import SamplingConfig, generate, left_pad
from ctxtree.kernels.inject import batch_context
from ctxtree.kernels.tree import ContextTree, search_documents


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    selections: list[torch.Tensor]       # per document: heap indices [C, h+1], rows of 0 not injected
    timings: dict[str, float] = field(default_factory=dict)


def search(rt: Runtime, trees: list[ContextTree], question: str, policy: str = "query") -> tuple[list[int], list[torch.Tensor]]:
    """The question's prompt and, per document, the nodes the decoder will be given
    (heap indices [C, h+1], rows of NOT_INJECTED for chunks left out)."""
    prompt, query_index = question_prompt(rt.tokenizer, question)
    batch = left_pad([prompt], device=rt.model.device)
    q = query_vector(rt.model, batch.input_ids, batch.positions, batch.token_valid,
                     torch.tensor([query_index + batch.input_ids.shape[1] - len(prompt)]))[0]
    route = route_query(rt.model, q, question_tokens(rt.tokenizer, question))
    return prompt, search_documents(trees, route, policy, rt.decoder.top_chunks)


def answer_question(rt: Runtime, trees: list[ContextTree], question: str, sampling: SamplingConfig,
                    policy: str = "query", seed: int = 0,
                    on_text: Callable[[str], None] | None = None) -> Answer:
    """Answer with the injection decoder; on_text receives the answer as it streams."""
    t0 = time.perf_counter()
    prompt, selections = search(rt, trees, question, policy)
    context = batch_context([rt.decoder.request_kv(trees, selections)])
    t_search = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    stream = TextStream(rt.tokenizer)
    t_first = None
    for step in generate(rt.decoder, [prompt], context, sampling, rt.stop_ids, [gen]):
        token = step[0]
        if token is None:
            break
        if t_first is None:
            t_first = time.perf_counter()
        if token in rt.stop_ids:
            break
        piece = stream.push(token)
        if on_text is not None and piece:
            on_text(piece)
    t_end = time.perf_counter()
    rest = stream.flush()
    if on_text is not None and rest:
        on_text(rest)
    tokens, text = stream.tokens, stream.shown
    t_first = t_first or t_end
    decode_s = t_end - t_first
    return Answer(text=text.strip(), token_ids=tokens, selections=selections, timings={
        "search_ms": 1000 * (t_search - t0),
        "ttft_ms": 1000 * (t_first - t0),
        "total_ms": 1000 * (t_end - t0),
        "tokens": len(tokens),
        "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
    })

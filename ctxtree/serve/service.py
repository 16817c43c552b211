"""What a decoder replica does, without Ray Serve: resolve documents through the tree
cache, batch the question with concurrent ones, stream the answer with timings.

The Serve deployment (and any other front end) calls these methods and maps the
domain errors to HTTP in one place: unknown document (store NotFound), fingerprint
mismatch, corrupt object, too many documents / too long a question / trees larger than
the cache (RequestTooLarge, TooLarge), invalid settings (ValueError).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from ctxtree.detok import TextStream
from ctxtree.prompt import question_prompt, question_tokens
from ctxtree.runtime import Runtime, cache_dir, load_runtime
from ctxtree.store import Corrupt, TreeStore
from ctxtree.kernels.engines import check_engine, make_engine
from ctxtree.kernels.vllm_engine import VllmConfig
from ctxtree.kernels.generate import SamplingConfig
from ctxtree.kernels.inject import READ_AS_TRAINED
from ctxtree.kernels.tree import POLICIES, TreeConfig
from ctxtree.serve.engine import BatchingEngine, GenRequest
from ctxtree.serve.protocol import ReplicaStats, RequestTooLarge
from ctxtree.serve.tree_cache import TreeCache

__all__ = ["AnswerEnd", "DecoderService", "RequestTooLarge", "ServiceConfig"]


@dataclass(frozen=True)
class ServiceConfig:
    store: str
    model: str | None = None
    adapter: str | None = None
    top_chunks: int | None = None   # chunks injected per request; None: as the adapter was trained
    reading_from: int | None | str = READ_AS_TRAINED  # first reading layer (kernels/reading.py); None: off
    tree: TreeConfig = field(default_factory=TreeConfig)
    device: str | None = None       # None: the GPU if Ray gave this replica one, else cpu
    cache_bytes: int = 1 << 30
    max_documents: int = 16
    max_question_tokens: int = 1024
    max_answer_tokens: int = 1024
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    engine: str = "torch"              # what decodes: torch (default, reference) or vllm (kernels/engines.py)
    max_context_positions: int = VllmConfig.max_context_positions  # vllm engine: injected positions per request

    def __post_init__(self) -> None:
        for name in ("cache_bytes", "max_documents", "max_question_tokens", "max_answer_tokens", "max_batch",
                     "max_context_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_engine(self.engine)


@dataclass
class AnswerEnd:
    """The last event of an answer stream."""
    documents: list[str]
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]
    selections: list[list[list[int]]]   # per document, per chunk: heap indices of injected nodes (all 0: none)
    replica: str = "local"              # which decoder replica answered (set by the Serve deployment)
    finish_reason: str = "stop"         # OpenAI's: "stop" (end of answer or a stop sequence), "length"


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence begins in text, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


class DecoderService:
    def __init__(self, config: ServiceConfig, runtime: Runtime | None = None):
        self.config = config
        self.rt = runtime or load_runtime(Path(config.model) if config.model else None, config.tree,
                                          Path(config.adapter) if config.adapter else None,
                                          top_chunks=config.top_chunks, device=config.device,
                                          reading_from=config.reading_from)
        self.store = TreeStore(config.store)
        self.cache = TreeCache(self.store, self.rt.fingerprint, config.cache_bytes)
        # this service makes the decode engine, so it closes it
        self.decode = make_engine(config.engine, self.rt.decoder, self.rt.ckpt_dir, cache_dir(), VllmConfig(
            max_context_positions=config.max_context_positions, max_prompt_tokens=config.max_question_tokens,
            max_new_tokens=config.max_answer_tokens, max_batch=config.max_batch))
        self.engine = BatchingEngine(self.rt.decoder, self.rt.stop_ids, config.max_batch, config.batch_wait_ms,
                                     self.decode)

    @property
    def model_name(self) -> str:
        return self.rt.ckpt_dir.name

    def _check(self, documents: list[str], sampling: SamplingConfig, policy: str) -> None:
        if len(documents) > self.config.max_documents:
            raise RequestTooLarge(f"{len(documents)} documents; this endpoint accepts at most "
                                  f"{self.config.max_documents} per request")
        if sampling.max_tokens > self.config.max_answer_tokens:
            raise RequestTooLarge(f"max_tokens {sampling.max_tokens} exceeds the limit "
                                  f"{self.config.max_answer_tokens}")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} unknown; expected one of {POLICIES}")
        if len(set(documents)) != len(documents):
            raise ValueError("a document is listed twice")

    async def answer(self, documents: list[str], question: str, sampling: SamplingConfig, seed: int = 0,
                     policy: str = "query", stop: tuple[str, ...] = ()) -> AsyncIterator[str | AnswerEnd]:
        """Yield the answer's text pieces, then one AnswerEnd. Errors are raised before the
        first piece (validation, documents, question), so a caller can answer with a
        status code before it starts streaming. The answer ends before the first of the
        `stop` sequences (not included), which also stops generating."""
        t0 = time.perf_counter()
        self._check(documents, sampling, policy)
        prompt, query_index = question_prompt(self.rt.tokenizer, question)
        if len(prompt) > self.config.max_question_tokens:
            raise RequestTooLarge(f"the question is {len(prompt)} tokens; the limit is "
                                  f"{self.config.max_question_tokens}")
        # every document loads at once (the cache joins loads of one document and fetches
        # different ones concurrently): a request's load time is its slowest document's
        cached = await asyncio.gather(*(self.cache.get(doc_id) for doc_id in documents))
        t_loaded = time.perf_counter()
        request = GenRequest(prompt=prompt, query_index=query_index,
                             question_ids=question_tokens(self.rt.tokenizer, question), trees=[c.tree for c in cached],
                             sampling=sampling, seed=seed, policy=policy)
        text = TextStream(self.rt.tokenizer)
        t_first = None
        # Text that might be the start of a stop sequence is held back until it is not.
        held, hold, stopped = "", max((len(s) for s in stop), default=1) - 1, False
        tokens = self.engine.stream(request)
        try:
            async for token in tokens:
                if t_first is None:
                    t_first = time.perf_counter()
                held += text.push(token)
                cut = first_stop(held, stop)
                if cut is not None:
                    held, stopped = held[:cut], True
                    break
                if len(held) > hold:
                    yield held[:len(held) - hold]
                    held = held[len(held) - hold:]
        finally:
            await tokens.aclose()  # a stop sequence (or a consumer gone) stops generating
        if not stopped:
            held += text.flush()
            cut = first_stop(held, stop)
            held, stopped = (held, False) if cut is None else (held[:cut], True)
        if held:
            yield held
        t_end = time.perf_counter()
        t_first = t_first or t_end
        n = len(text.tokens)
        yield AnswerEnd(
            documents=documents, prompt_tokens=len(prompt), completion_tokens=n,
            finish_reason="length" if n >= sampling.max_tokens and not stopped else "stop",
            selections=[s.tolist() for s in request.selections],
            timings={"load_ms": 1000 * (t_loaded - t0), "ttft_ms": 1000 * (t_first - t0),
                     "total_ms": 1000 * (t_end - t0),
                     "tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0})

    async def document(self, doc_id: str) -> dict:
        """What is stored for a document (without loading its trees)."""
        m = self.store.manifest(doc_id)
        if m.fingerprint == self.rt.fingerprint and m.tree_config != self.rt.tree_config.to_dict():
            # the fingerprint names this decoder's tree settings: the manifest disagrees with it
            err = Corrupt("the manifest's tree settings disagree with its fingerprint")
            err.doc_id = doc_id
            raise err
        return {"id": doc_id, "tokens": m.n_tokens, "chunks": m.n_chunks, "bytes": m.total_bytes,
                "shards": len(m.shards), "fingerprint": m.fingerprint, "tree_config": m.tree_config,
                "compatible": m.fingerprint == self.rt.fingerprint, "cached": doc_id in self.cache}

    def stats(self, replica: str) -> ReplicaStats:
        """The cache's counters now; the load times recorded since the last call move
        into this snapshot (each load time is reported once)."""
        c = self.cache.stats
        loads = list(c.load_ms)
        del c.load_ms[:len(loads)]
        return ReplicaStats(replica=replica, hits=c.hits, misses=c.misses, evictions=c.evictions,
                            load_errors=c.load_errors, bytes=c.bytes, budget_bytes=self.cache.budget_bytes,
                            load_ms=loads)

    async def prewarm(self, documents: list[str]) -> dict:
        loaded = await asyncio.gather(*(self.cache.get(d) for d in documents))
        return {"documents": documents, "bytes": sum(c.nbytes for c in loaded)}

    def close(self) -> None:
        self.engine.close(wait=True)  # the batch decoding now finishes before its engine goes
        self.decode.close()
        self.cache.close()

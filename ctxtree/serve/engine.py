"""Dynamic batching for a decoder replica: concurrent requests, each with its own
documents, run through the injection decoder as one batch (left-padded prompts,
key masks over each request's own injected K/V) and stream their tokens back.

A batch gathers the requests waiting when the model is free, up to max_batch, after
waiting at most max_wait_ms for company. Requests batch only with requests of the same
sampling settings (one SamplingConfig per generate call); each keeps its own seeded
generator, so its tokens are the same whether it ran alone or in a batch. The model
runs in one worker thread: the event loop stays free for I/O and tree loads.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from ctxtree.kernels.compressor import query_vector, route_query
from ctxtree.kernels.engines import DecodeEngine, TorchEngine
from ctxtree.kernels.generate import SamplingConfig, left_pad
from ctxtree.kernels.inject import InjectionDecoder
from ctxtree.kernels.tree import ContextTree, search_documents
from ctxtree.serve.protocol import RequestTooLarge

_DONE = object()


@dataclass
class GenRequest:
    prompt: list[int]
    query_index: int                 # the question's last token in prompt (routing query)
    question_ids: list[int]          # the question's own tokens (token-match search)
    trees: list[ContextTree]         # documents in request order
    sampling: SamplingConfig
    seed: int = 0
    policy: str = "query"
    selections: list[torch.Tensor] = field(default_factory=list)   # filled in: nodes the search chose


@dataclass
class _Pending:
    request: GenRequest
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


class BatchingEngine:
    def __init__(self, decoder: InjectionDecoder, stop_ids: tuple[int, ...], max_batch: int = 8,
                 max_wait_ms: float = 5.0, engine: DecodeEngine | None = None):
        """decoder: search and the injected K/V; engine: what decodes (kernels/engines.py;
        default the torch engine over the same decoder)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.decoder = decoder
        self.engine = engine or TorchEngine(decoder)
        self.stop_ids = stop_ids
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._waiting: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        self.batches_run = 0
        self.batch_sizes: list[int] = []

    async def stream(self, request: GenRequest) -> AsyncIterator[int]:
        """Yield the request's tokens as they are generated (stop token excluded)."""
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done() or self._loop is not loop:
            # one batching task per event loop (a server restarts its loop, tests run several)
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._runner = asyncio.create_task(self._run())
        pending = _Pending(request, asyncio.Queue())
        self._waiting.append(pending)
        self._wakeup.set()
        try:
            while True:
                item = await pending.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            pending.cancelled.set()  # a client that went away stops costing tokens

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._waiting:
                continue
            await asyncio.sleep(self.max_wait_s)  # let concurrent requests join the batch
            while self._waiting:
                first = self._waiting[0].request.sampling
                batch = [p for p in self._waiting if p.request.sampling == first][: self.max_batch]
                for p in batch:
                    self._waiting.remove(p)
                batch = [p for p in batch if not p.cancelled.is_set()]
                if not batch:
                    continue
                self.batches_run += 1
                self.batch_sizes.append(len(batch))
                await loop.run_in_executor(self._model_thread, self._generate, batch, loop)

    def _generate(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        def send(p: _Pending, item) -> None:
            loop.call_soon_threadsafe(p.queue.put_nowait, item)

        try:
            requests = [p.request for p in batch]
            model = self.decoder.base
            padded = left_pad([r.prompt for r in requests], device=model.device)
            shift = padded.input_ids.shape[1] - padded.lengths
            q = query_vector(model, padded.input_ids, padded.positions, padded.token_valid,
                             torch.tensor([r.query_index for r in requests], device=model.device) + shift)
            contexts, fits = [], []
            for row, (p, r) in enumerate(zip(batch, requests)):
                route = route_query(model, q[row], r.question_ids)
                r.selections = search_documents(r.trees, route, r.policy, self.decoder.top_chunks)
                try:
                    kv = self.decoder.request_kv(r.trees, r.selections)  # reading layers: may exceed the window
                    self.engine.check(r.prompt, kv, r.sampling)
                except ValueError as e:  # beyond this engine's limits: that request fails, not its batch
                    send(p, RequestTooLarge(str(e)))
                    continue
                contexts.append(kv)
                fits.append(row)
            batch, requests = ([x[row] for row in fits] for x in (batch, requests))
            if not batch:
                return
            finished = [False] * len(batch)
            for step in self.engine.steps([r.prompt for r in requests], contexts, requests[0].sampling,
                                          self.stop_ids, [r.seed for r in requests]):
                for row, token in enumerate(step):
                    if finished[row]:
                        continue
                    if token is None or token in self.stop_ids:
                        finished[row] = True
                        send(batch[row], _DONE)
                    else:
                        send(batch[row], token)
                if all(finished[row] or batch[row].cancelled.is_set() for row in range(len(batch))):
                    break
            for row, p in enumerate(batch):
                if not finished[row]:
                    send(p, _DONE)
        except Exception as e:  # every waiter hears of it; the engine keeps serving
            for p in batch:
                send(p, e)

    def close(self, wait: bool = False) -> None:
        """Stop batching; wait: also for the batch decoding now (before its engine is closed)."""
        if self._runner is not None:
            self._runner.cancel()
        self._model_thread.shutdown(wait=wait, cancel_futures=True)

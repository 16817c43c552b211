"""The HTTP ingress deployment: the FastAPI app of ctxtree/serve/app.py in front of the decoder
deployment (ctxtree/serve/decoder.py), reached through a Serve deployment handle.

It is light on purpose (async I/O only, no model, `num_cpus: 0` like Serve's own
proxy) and does three things the decoder replicas cannot do for themselves: pick the
replica by document (`multiplexed_model_id` = routing_key of the request's first
document; the first listed document is the one a request is routed by), turn Serve's
back pressure (the decoder's `max_queued_requests`) into 503, and gather every
replica's tree-cache counters from their replies into one /metrics.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ctxtree.serve.app import build_app
from ctxtree.serve.backends import Event, ModelInfo
from ctxtree.serve.protocol import AnswerRequest, Failure, Overloaded, ReplicaStats, failure_of, routing_key


def _failure(e: Exception) -> Failure:
    if isinstance(e, BackPressureError):
        return failure_of(Overloaded(f"the decoder queue is full, retry later ({e})"))
    return failure_of(e)  # anything else raised in transit is a 500, never a partial answer


class ServeBackend:
    """ctxtree/serve/backends.py's Backend over a handle to the decoder deployment."""

    def __init__(self, decoder: DeploymentHandle):
        self.decoder = decoder
        self._info: ModelInfo | None = None
        self._latest: dict[str, ReplicaStats] = {}
        self._loads: list[float] = []

    def _record(self, stats: ReplicaStats) -> None:
        self._loads.extend(stats.load_ms)
        stats.load_ms = []
        self._latest[stats.replica] = stats

    def _to(self, doc_ids: list[str]) -> DeploymentHandle:
        return self.decoder.options(multiplexed_model_id=routing_key(doc_ids[0]) if doc_ids else "")

    async def info(self) -> ModelInfo:
        if self._info is None:  # every replica loads the same model: ask once
            self._info = await self.decoder.info.remote()
        return self._info

    async def answer(self, request: AnswerRequest) -> AsyncIterator[Event]:
        stream = self._to(request.documents).options(stream=True).answer.remote(request)
        finished = False
        try:
            async for item in stream:
                if isinstance(item, ReplicaStats):
                    self._record(item)
                else:
                    yield item
            finished = True
        except Exception as e:
            finished = True
            yield _failure(e)
        finally:
            if not finished:
                stream.cancel()  # the client went away: the replica stops generating

    async def _call(self, doc_ids: list[str], method: str, arg) -> dict | Failure:
        try:
            out, stats = await getattr(self._to(doc_ids), method).remote(arg)
        except Exception as e:
            return _failure(e)
        self._record(stats)
        return out

    async def document(self, doc_id: str) -> dict | Failure:
        return await self._call([doc_id], "document", doc_id)

    async def prewarm(self, documents: list[str]) -> dict | Failure:
        """Each document is warmed on the replica its queries will be routed to."""
        outs = await asyncio.gather(*(self._call([d], "prewarm", [d]) for d in documents))
        failed = next((o for o in outs if isinstance(o, Failure)), None)
        if failed is not None:
            return failed
        return {"documents": documents, "bytes": sum(o["bytes"] for o in outs),
                "replicas": {d: r for o in outs for d, r in o["replicas"].items()}}

    def replica_stats(self) -> tuple[list[ReplicaStats], list[float]]:
        loads, self._loads = self._loads, []
        return list(self._latest.values()), loads


@serve.deployment(name="ingress", max_ongoing_requests=256, max_queued_requests=256,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, decoder: DeploymentHandle):
        self.backend = ServeBackend(decoder)

    def __serve_build_asgi_app__(self):
        return build_app(self.backend)

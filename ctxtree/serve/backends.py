"""What the HTTP routes (ctxtree/serve/app.py) call: a `Backend`. Two exist: `LocalBackend`, a
DecoderService in this process (tests, embedding), and `ServeBackend`
(ctxtree/serve/ingress.py), decoder replicas behind a Ray Serve handle. Both speak
ctxtree/serve/protocol.py: answers are streams of text pieces ending in an AnswerEnd, and
every domain error arrives as a Failure value instead of an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from ctxtree.serve.protocol import AnswerRequest, Failure, ReplicaStats, failure_of
from ctxtree.serve.service import AnswerEnd, DecoderService

Event = str | AnswerEnd | Failure


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str


class Backend(Protocol):
    async def info(self) -> ModelInfo: ...

    def answer(self, request: AnswerRequest) -> AsyncIterator[Event]:
        """Text pieces then one AnswerEnd; or a Failure (first, or where it went wrong)."""

    async def document(self, doc_id: str) -> dict | Failure: ...

    async def prewarm(self, documents: list[str]) -> dict | Failure: ...

    def replica_stats(self) -> tuple[list[ReplicaStats], list[float]]:
        """Each replica's latest tree-cache counters, and load times (ms) not yet reported."""


async def answer_events(service: DecoderService, request: AnswerRequest, replica: str) -> AsyncIterator[Event]:
    """service.answer as Events: an error becomes a Failure item, and the stream ends there."""
    stream = service.answer(request.documents, request.question, request.sampling, request.seed, request.policy,
                            request.stop)
    try:
        async for item in stream:
            if isinstance(item, AnswerEnd):
                item.replica = replica
            yield item
    except Exception as e:  # not CancelledError: a cancelled request just stops
        yield failure_of(e)
    finally:
        await stream.aclose()  # the consumer went away: stop generating for it


async def guarded(call) -> dict | Failure:
    try:
        return await call
    except Exception as e:
        return failure_of(e)


class LocalBackend:
    def __init__(self, service: DecoderService, replica: str = "local"):
        self.service = service
        self.replica = replica

    async def info(self) -> ModelInfo:
        return ModelInfo(self.service.model_name, self.service.rt.fingerprint)

    def answer(self, request: AnswerRequest) -> AsyncIterator[Event]:
        return answer_events(self.service, request, self.replica)

    async def document(self, doc_id: str) -> dict | Failure:
        return await guarded(self.service.document(doc_id))

    async def prewarm(self, documents: list[str]) -> dict | Failure:
        out = await guarded(self.service.prewarm(documents))
        return out if isinstance(out, Failure) else {**out, "replicas": {d: self.replica for d in documents}}

    def replica_stats(self) -> tuple[list[ReplicaStats], list[float]]:
        stats = self.service.stats(self.replica)
        return [stats], stats.load_ms

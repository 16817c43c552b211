"""The decoder deployment on Ray Serve: each replica holds the model, a tree cache and a
batching engine (ctxtree/serve/service.py); the HTTP ingress (ctxtree/serve/ingress.py) calls it
through a deployment handle.

    serve run ctxtree.serve.decoder:app_builder store=ctxtree-data      (or `ctxtree serve --store ...`)

Routing by document (Serve model multiplexing). The ingress sends each request with
`multiplexed_model_id` = routing_key(its first document) (ctxtree/serve/protocol.py). On the
replica, `_advertise` is the `@serve.multiplexed` loader: it only records the key, so
Serve tells every router "this replica holds that document" and later requests for it
prefer this replica (after a 1 s wait for a busy one, Serve falls back to the replica
with the fewest keys, then any). The trees themselves are loaded by the replica's
TreeCache, not by the loader, because Serve runs loaders under one lock per replica:
loading trees there would serialize every load (anchors.md #8), while the TreeCache loads
different documents concurrently, joins concurrent loads of one, and evicts by bytes.
Serve's own LRU of keys (ROUTING_KEYS per replica) can outlive an evicted tree; such a
stale preference costs one reload on that replica, never a wrong answer. A custom
request router (Serve's `request_router_config`) could not do better: it sees requests
before their HTTP body is read, so it cannot know the documents without an ingress.

Built from typed arguments (ServeArgs); `user_config` changes the cache budget of
running replicas without a restart. Queue bounds and autoscaling are deployment options
(infra/serve_config.yaml): a full decoder queue is a 503 at the ingress, not an
unbounded wait.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from ctxtree.kernels.tree import TreeConfig
from ctxtree.kernels.vllm_engine import VllmConfig
from ctxtree.serve.backends import ModelInfo, answer_events, guarded
from ctxtree.serve.protocol import AnswerRequest, Failure, ReplicaStats
from ctxtree.serve.service import DecoderService, ServiceConfig

ROUTING_KEYS = 256  # keys a replica advertises (LRU); more than the documents its cache usually holds


class ServeArgs(BaseModel):
    """Arguments of the application (the `args:` of a Serve config, or `serve run` key=value)."""
    model_config = ConfigDict(extra="forbid")
    store: str
    model: str | None = None
    adapter: str | None = None
    top_chunks: int | None = Field(default=None, ge=0)  # None: as the adapter was trained
    reading_from: int | Literal["none", "as-trained"] = "as-trained"  # first reading layer (kernels/reading.py)
    layers: int = TreeConfig.n_layers
    chunk_len: int = TreeConfig.chunk_len
    height: int = TreeConfig.height
    keep: int = TreeConfig.keep
    codec: str = TreeConfig.codec
    dtype: str = TreeConfig.dtype
    device: str | None = None  # None: the GPU when the replica has one (ray_actor_options num_gpus)
    cache_mb: float = Field(default=1024, gt=0)
    max_documents: int = Field(default=16, ge=1)
    max_question_tokens: int = Field(default=1024, ge=1)
    max_answer_tokens: int = Field(default=1024, ge=1)
    max_batch: int = Field(default=8, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0)
    engine: str = "torch"  # kernels/engines.py ENGINES; vllm: the replica's environment needs ctxtree[vllm]
    max_context_positions: int = Field(default=VllmConfig.max_context_positions, ge=1)

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(
            store=self.store, model=self.model, adapter=self.adapter, top_chunks=self.top_chunks,
            reading_from=None if self.reading_from == "none" else self.reading_from,
            tree=TreeConfig(n_layers=self.layers, chunk_len=self.chunk_len, height=self.height, keep=self.keep,
                            codec=self.codec, dtype=self.dtype),
            device=self.device,
            cache_bytes=int(self.cache_mb * 2 ** 20), max_documents=self.max_documents,
            max_question_tokens=self.max_question_tokens, max_answer_tokens=self.max_answer_tokens,
            max_batch=self.max_batch, batch_wait_ms=self.batch_wait_ms, engine=self.engine,
            max_context_positions=self.max_context_positions)


@serve.deployment(name="decoder", max_ongoing_requests=8, max_queued_requests=32,
                  ray_actor_options={"num_cpus": 1})
class Decoder:
    def __init__(self, args: dict):
        self.service = DecoderService(ServeArgs(**args).service_config())
        self.replica = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=ROUTING_KEYS)
    async def _advertise(self, key: str) -> str:
        return key  # cheap on purpose: Serve holds one lock per replica while a loader runs

    async def _route(self) -> None:
        key = serve.get_multiplexed_model_id()
        if key:
            await self._advertise(key)

    async def answer(self, request: AnswerRequest):
        """Streamed: text pieces, this replica's stats, then an AnswerEnd (or a Failure).
        Stats go first because the ingress stops reading at the last event."""
        await self._route()
        async for event in answer_events(self.service, request, self.replica):
            if not isinstance(event, str):
                yield self.stats()
            yield event

    async def document(self, doc_id: str) -> tuple[dict | Failure, ReplicaStats]:
        await self._route()
        return await guarded(self.service.document(doc_id)), self.stats()

    async def prewarm(self, documents: list[str]) -> tuple[dict | Failure, ReplicaStats]:
        await self._route()
        out = await guarded(self.service.prewarm(documents))
        if not isinstance(out, Failure):
            out = {**out, "replicas": {d: self.replica for d in documents}}
        return out, self.stats()

    async def info(self) -> ModelInfo:
        return ModelInfo(self.service.model_name, self.service.rt.fingerprint)

    def stats(self) -> ReplicaStats:
        return self.service.stats(self.replica)

    def reconfigure(self, user_config: dict) -> None:
        """user_config: {"cache_mb": N} resizes the tree cache (evicting as needed on the next load)."""
        if "cache_mb" in user_config:
            budget = int(float(user_config["cache_mb"]) * 2 ** 20)
            if budget <= 0:
                raise ValueError(f"cache_mb must be positive, got {user_config['cache_mb']}")
            self.service.cache.budget_bytes = budget

    def check_health(self) -> None:
        # Liveness: the model answers a one-token forward (an exception marks the replica unhealthy).
        import torch

        model = self.service.rt.model
        with torch.no_grad():
            model(torch.tensor([[1]], device=model.device), torch.tensor([[0]], device=model.device))


def app_builder(args: dict) -> Application:
    """`serve run ctxtree.serve.decoder:app_builder store=...` and the Serve config's import_path:
    the ingress in front of the decoder deployment."""
    from ctxtree.serve.ingress import Ingress

    return Ingress.bind(Decoder.bind(ServeArgs(**args).model_dump()))

"""The decoder deployment on Ray Serve: each replica holds the model, a tree cache and a
batching engine (serve/service.py) and serves the HTTP API (serve/app.py) itself.

    serve run serve.decoder:app_builder store=ctxtree-data      (or `ctxtree serve --store ...`)

Built from typed arguments (ServeArgs); `user_config` can change the cache budget of
running replicas without a restart. Queue bounds and autoscaling are deployment
options (serve/serve_config.yaml), so an overloaded replica set answers 503 instead of
queueing without end.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from kernels.tree import TreeConfig
from serve.app import build_app
from serve.service import DecoderService, ServiceConfig


class ServeArgs(BaseModel):
    """Arguments of the application (the `args:` of a Serve config, or `serve run` key=value)."""
    model_config = ConfigDict(extra="forbid")
    store: str
    model: str | None = None
    adapter: str | None = None
    layers: int = 4
    chunk_len: int = 1024
    height: int = 3
    keep: int = 32
    codec: str = "bf16"
    dtype: str = "float32"
    cache_mb: float = Field(default=1024, gt=0)
    max_documents: int = Field(default=16, ge=1)
    max_question_tokens: int = Field(default=1024, ge=1)
    max_answer_tokens: int = Field(default=1024, ge=1)
    max_batch: int = Field(default=8, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0)

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(
            store=self.store, model=self.model, adapter=self.adapter,
            tree=TreeConfig(n_layers=self.layers, chunk_len=self.chunk_len, height=self.height, keep=self.keep,
                            codec=self.codec, dtype=self.dtype),
            cache_bytes=int(self.cache_mb * 2 ** 20), max_documents=self.max_documents,
            max_question_tokens=self.max_question_tokens, max_answer_tokens=self.max_answer_tokens,
            max_batch=self.max_batch, batch_wait_ms=self.batch_wait_ms)


@serve.deployment(name="decoder", max_ongoing_requests=8, max_queued_requests=32,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress()
class Decoder:
    def __init__(self, args: dict):
        self.service = DecoderService(ServeArgs(**args).service_config())

    def __serve_build_asgi_app__(self):
        return build_app(self.service)

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

        with torch.no_grad():
            self.service.rt.model(torch.tensor([[1]]), torch.tensor([[0]]))


def app_builder(args: dict) -> Application:
    """`serve run serve.decoder:app_builder store=...` and the Serve config's import_path."""
    return Decoder.bind(ServeArgs(**args).model_dump())

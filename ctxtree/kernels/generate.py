"""Generation: prefill, one decode step, and a generator that yields tokens.

Batches are left-padded so every row appends its next token at the same cache
slot; each row keeps its own positions (0 at its first real token). Randomness is
an argument: one torch.Generator per row, so a request samples the same tokens
whether it runs alone or in a batch. Temperature 0 is greedy for any seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from ctxtree.kernels.inject import InjectedContext, InjectionDecoder
from ctxtree.kernels.llama import KVCache


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class PaddedBatch:
    """input_ids/positions/token_valid [B,T], left-padded."""
    input_ids: Tensor
    positions: Tensor
    token_valid: Tensor
    lengths: Tensor  # [B] real prompt lengths


def left_pad(prompts: list[list[int]], pad_id: int = 0, device: torch.device | str = "cpu") -> PaddedBatch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    b, t = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    valid = torch.zeros(b, t, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, t - len(p):] = torch.tensor(p)
        valid[row, t - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    lengths = torch.tensor([len(p) for p in prompts])
    return PaddedBatch(ids.to(device), positions.to(device), valid.to(device), lengths.to(device))


@torch.no_grad()
def prefill(decoder: InjectionDecoder, batch: PaddedBatch, cache: KVCache,
            context: InjectedContext | None) -> Tensor:
    """Run the prompts into the cache; logits of each row's last token [B,V]."""
    logits = decoder(batch.input_ids, batch.positions, batch.token_valid, cache, context, last_only=True)
    return logits[:, -1]


@torch.no_grad()
def decode_step(decoder: InjectionDecoder, tokens: Tensor, positions: Tensor, cache: KVCache,
                context: InjectedContext | None) -> Tensor:
    """One token per row: tokens/positions [B] -> logits [B,V]."""
    logits = decoder(tokens[:, None], positions[:, None], None, cache, context, last_only=True)
    return logits[:, -1]


def sample(logits: Tensor, cfg: SamplingConfig, generators: list[torch.Generator] | None) -> Tensor:
    """logits [B,V] -> next tokens [B]."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # Sampled on the CPU with each row's own CPU generator: the same draws on any device.
    probs = probs.cpu()
    out = torch.empty(probs.shape[0], dtype=torch.long)
    for row in range(probs.shape[0]):
        gen = generators[row] if generators is not None else None
        out[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
    return out.to(logits.device)


def generate(decoder: InjectionDecoder, prompts: list[list[int]], context: InjectedContext | None,
             cfg: SamplingConfig, stop_ids: tuple[int, ...] = (),
             generators: list[torch.Generator] | None = None,
             on_step: Callable[[list[int | None]], None] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once that row has stopped).

    A row stops after emitting a stop id (which is yielded) or max_tokens tokens.
    on_step, if given, is called with each step's tokens before it is yielded (a
    streaming callback for callers that drain the generator elsewhere).
    """
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
    base = decoder.base
    batch = left_pad(prompts, device=base.device)
    b, t = batch.input_ids.shape
    cache = KVCache.allocate(base.cfg, b, t + cfg.max_tokens, base.dtype, base.device)
    logits = prefill(decoder, batch, cache, context)
    positions = batch.lengths.clone()
    done = torch.zeros(b, dtype=torch.bool, device=base.device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=base.device)
    for step in range(cfg.max_tokens):
        tokens = sample(logits, cfg, generators)
        step_tokens = [None if done[r] else int(tokens[r]) for r in range(b)]
        if on_step is not None:
            on_step(step_tokens)
        yield step_tokens
        done |= torch.isin(tokens, stops)
        if bool(done.all()) or step == cfg.max_tokens - 1:
            return
        logits = decode_step(decoder, tokens, positions, cache, context)
        positions += 1

"""The vLLM engine for the injection decoder: the same requests as kernels/generate.py
(prompt tokens + each request's injected K/V), decoded by vLLM (ctxtree/kernels/vllm_model.py).

The torch engine (kernels/generate.py) stays the default and the reference: greedy tokens
of this engine equal its tokens (tests/test_vllm_engine.py, `make test-vllm`).
Sampled tokens (temperature > 0) come from vLLM's own per-request seeded sampler: the same
for a seed and a request, not the torch engine's draws.

vLLM is optional (`pip install ctxtree[vllm]` on GPU nodes, `make test-vllm` here): this
module imports it (and vllm_model.py) when an engine is built, never at import time.

What vLLM gets is a model directory made once per (base checkpoint, adapter, context
limit), content-addressed under the cache dir: the base config with the injection fields,
links to the base weights and tokenizer, and the adapter's weights renamed to the vLLM
model's names. Written to a temporary directory and renamed into place (weights.make_dir_once).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ctxtree.kernels.generate import SamplingConfig
from ctxtree.kernels.inject import InjectionDecoder, RequestKV
from ctxtree.kernels.weights import make_dir_once

# What the vLLM model (ctxtree/kernels/vllm_model.py, the only module that imports vLLM at
# its top) and this module agree on:
ARCHITECTURE = "CtxtreeInjectionLlama"
MODALITY = "context"
CONFIG_LAYERS = "ctxtree_injection_layers"             # config.json: M
CONFIG_MAX_POSITIONS = "ctxtree_max_context_positions"  # config.json: the most injected positions per request

# tokenizer files the converted checkpoints carry (weights.convert_gguf: save_pretrained)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "chat_template.jinja")
VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class VllmConfig:
    """max_context_positions: the most injected positions one request may carry (vLLM
    reserves cross-attention cache for it); max_prompt_tokens: the longest question prompt;
    max_batch: requests decoded together; kv_cache_gib: the KV cache vLLM's CPU backend
    allocates (VLLM_CPU_KVCACHE_SPACE; GPUs size theirs from gpu_memory_utilization)."""
    max_context_positions: int = 4096
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    max_batch: int = 8
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_context_positions", "max_prompt_tokens", "max_new_tokens", "max_batch", "kv_cache_gib"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def context_width(n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """Features per injected position in the "context" tensor: M layers x (K, V) x Hkv x Dh."""
    return n_layers * 2 * n_kv_heads * head_dim


def context_tensor(kv: RequestKV) -> torch.Tensor:
    """RequestKV (keys/values [M,Hkv,S,Dh]) -> the "context" item [max(S,1), M*2*Hkv*Dh]:
    per position, layer by layer, the key heads then the value heads. No positions: one
    zero position (vllm_model.py says why)."""
    m, hkv, s, dh = kv.keys.shape
    if s == 0:
        return torch.zeros(1, context_width(m, hkv, dh), dtype=kv.keys.dtype)
    both = torch.stack([kv.keys, kv.values], dim=1)  # [M,2,Hkv,S,Dh]
    return both.permute(3, 0, 1, 2, 4).reshape(s, m * 2 * hkv * dh).cpu().contiguous()


def _adapter_weights(decoder: InjectionDecoder) -> dict[str, torch.Tensor]:
    """The cross blocks' weights under the vLLM model's names."""
    if decoder.copy_head is not None:
        raise ValueError("the vLLM engine does not run adapters with a copy head (its pointer mixes into "
                         "the output distribution per request); use the torch engine")
    if decoder.upper is not None:
        raise ValueError("the vLLM engine does not run adapters with upper-layer adapters; use the torch engine")
    if decoder.reading_from is not None:
        raise ValueError("the vLLM engine does not run reading layers (a per-request prefix in self-attention); "
                         "use the torch engine or --reading-from none")
    out = {}
    for i, block in enumerate(decoder.cross_attn):
        prefix = f"model.layers.{i}.cross_attn"
        out[f"{prefix}.query.weight"] = block.q_proj.weight
        out[f"{prefix}.out.weight"] = block.o_proj.weight
        out[f"{prefix}.cross_norm.weight"] = block.cross_norm.weight
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def prepare_model_dir(ckpt_dir: Path, decoder: InjectionDecoder, max_context_positions: int,
                      cache_dir: Path) -> Path:
    """The directory vLLM loads (module docstring); made once, reused after."""
    ckpt_dir = Path(ckpt_dir)
    if decoder.base.cfg.qkv_bias or decoder.base.cfg.o_bias:
        raise ValueError("the vLLM engine supports base models without attention biases")
    weights = _adapter_weights(decoder)
    h = hashlib.sha256()
    h.update(json.dumps({"ckpt": str(ckpt_dir.resolve()), "config": (ckpt_dir / "config.json").read_text(),
                         "layers": decoder.n_layers, "max_positions": max_context_positions}).encode())
    for name in sorted(weights):
        h.update(name.encode() + weights[name].numpy().tobytes())

    def write(tmp: Path) -> None:
        config = json.loads((ckpt_dir / "config.json").read_text())
        config.update({"architectures": [ARCHITECTURE], "is_encoder_decoder": True,
                       CONFIG_LAYERS: decoder.n_layers, CONFIG_MAX_POSITIONS: max_context_positions})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in sorted(ckpt_dir.glob("*.safetensors")):
            os.symlink(f.resolve(), tmp / f.name)
        for name in _TOKENIZER_FILES:
            if (ckpt_dir / name).is_file():
                os.symlink((ckpt_dir / name).resolve(), tmp / name)
        save_file(weights, str(tmp / "ctxtree-injection.safetensors"))

    return make_dir_once(Path(cache_dir) / "vllm" / h.hexdigest()[:16], write)


class VllmDecoder:
    """Decodes batches of (prompt, injected K/V) with vLLM. Build it where the model should
    run (a decoder replica); it owns one vllm.LLM."""

    def __init__(self, decoder: InjectionDecoder, ckpt_dir: Path, cache_dir: Path,
                 config: VllmConfig = VllmConfig()):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
        import vllm  # optional dependency: ctxtree[vllm]

        from ctxtree.kernels.vllm_plugin import register

        register()  # this process; vLLM's own processes load it through the entry point
        dtype = decoder.base.dtype
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"the vLLM engine runs float32, bfloat16 or float16, not {dtype}")
        self.config = config
        self.n_layers = decoder.n_layers
        self.model_dir = prepare_model_dir(ckpt_dir, decoder, config.max_context_positions, cache_dir)
        self.llm = vllm.LLM(
            model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=VLLM_DTYPES[dtype],
            enforce_eager=True, enable_mm_embeds=True, limit_mm_per_prompt={MODALITY: 1},
            max_model_len=config.max_prompt_tokens + config.max_new_tokens,
            max_num_batched_tokens=config.max_context_positions + config.max_prompt_tokens,
            max_num_seqs=config.max_batch, generation_config="vllm", seed=0,
            gpu_memory_utilization=config.gpu_memory_utilization,
            mm_processor_cache_gb=0)  # every context is a request's own: nothing to reuse

    def steps(self, prompts: list[list[int]], contexts: list[RequestKV], sampling: SamplingConfig,
              stop_ids: tuple[int, ...] = (), seeds: list[int] | None = None) -> Iterator[list[int | None]]:
        """Per decoding step, each request's new token (None once it has stopped), as
        kernels/generate.py generate yields them: the stop token that ended a request is
        yielded. Tokens stream as vLLM's engine steps produce them; a request vLLM scheduled
        later than the others holds the step back until it catches up. Closing the iterator
        early aborts what is still running. One steps() at a time per decoder (the replica's
        batching engine runs one batch at a time)."""
        from vllm import SamplingParams

        if len(prompts) != len(contexts):
            raise ValueError(f"{len(prompts)} prompts but {len(contexts)} contexts")
        seeds = seeds if seeds is not None else [0] * len(prompts)
        for prompt, kv in zip(prompts, contexts):
            self.check(prompt, kv, sampling)
        requests = [self._request(prompt, kv) for prompt, kv in zip(prompts, contexts)]
        engine = self.llm.llm_engine
        batch = uuid.uuid4().hex
        ids = [f"{batch}-{row}" for row in range(len(prompts))]
        row_of = {rid: row for row, rid in enumerate(ids)}
        pending: list[deque[int]] = [deque() for _ in ids]   # tokens vLLM made, not yet yielded
        seen = [0] * len(ids)                                 # tokens vLLM made so far, per request
        ended = [False] * len(ids)                            # vLLM finished the request
        done = [False] * len(ids)                             # ...and its last token was yielded
        added: list[str] = []
        try:
            for rid, request, seed in zip(ids, requests, seeds):
                engine.add_request(rid, request, SamplingParams(
                    max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                    seed=seed, stop_token_ids=list(stop_ids), ignore_eos=True, detokenize=False))
                added.append(rid)
            while not all(done):
                while not all(done) and all(done[r] or pending[r] for r in range(len(ids))):
                    step: list[int | None] = []
                    for r in range(len(ids)):
                        if done[r]:
                            step.append(None)
                            continue
                        step.append(pending[r].popleft())
                        done[r] = ended[r] and not pending[r]
                    yield step
                if all(done):
                    return
                if not engine.has_unfinished_requests():
                    raise RuntimeError("vLLM finished without the tokens of every request")
                for out in engine.step():
                    r = row_of.get(out.request_id)
                    if r is None:
                        continue
                    tokens = out.outputs[0].token_ids
                    pending[r].extend(tokens[seen[r]:])
                    seen[r] = len(tokens)
                    ended[r] = out.finished
                    if ended[r] and not seen[r]:  # an abort or an error: no answer to stream
                        raise RuntimeError(f"vLLM ended a request without a token "
                                           f"({out.outputs[0].finish_reason})")
        finally:
            unfinished = [rid for rid in added if not ended[row_of[rid]]]
            if unfinished:
                engine.abort_request(unfinished)

    def generate(self, prompts: list[list[int]], contexts: list[RequestKV], sampling: SamplingConfig,
                 stop_ids: tuple[int, ...] = (), seeds: list[int] | None = None) -> list[list[int]]:
        """Each request's new tokens, the stop token included when one ended it."""
        rows: list[list[int]] = [[] for _ in prompts]
        for step in self.steps(prompts, contexts, sampling, stop_ids, seeds):
            for row, token in enumerate(step):
                if token is not None:
                    rows[row].append(token)
        return rows

    def check(self, prompt: list[int], kv: RequestKV, sampling: SamplingConfig) -> None:
        """ValueError, naming the limit, for a request beyond this engine's buffers."""
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        if len(prompt) > self.config.max_prompt_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens; this engine takes at most "
                             f"{self.config.max_prompt_tokens} (VllmConfig.max_prompt_tokens)")
        if sampling.max_tokens > self.config.max_new_tokens:
            raise ValueError(f"max_tokens {sampling.max_tokens} > {self.config.max_new_tokens} "
                             f"(VllmConfig.max_new_tokens)")
        if kv.keys.shape[0] != self.n_layers:
            raise ValueError(f"context has K/V for {kv.keys.shape[0]} layers, the model injects {self.n_layers}")
        if kv.keys.shape[2] > self.config.max_context_positions:
            raise ValueError(f"{kv.keys.shape[2]} injected positions; this engine takes at most "
                             f"{self.config.max_context_positions} (VllmConfig.max_context_positions)")

    @staticmethod
    def _request(prompt: list[int], kv: RequestKV) -> dict:
        """One request as vLLM's explicit encoder/decoder prompt."""
        return {
            "encoder_prompt": {"prompt_token_ids": [0], "multi_modal_data": {MODALITY: context_tensor(kv)},
                               # every request's context is its own: skip hashing its bytes
                               "multi_modal_uuids": {MODALITY: [uuid.uuid4().hex]}},
            "decoder_prompt": {"prompt_token_ids": list(prompt)},
        }

    def close(self) -> None:
        """Stop vLLM's engine process now (it would stop at interpreter exit otherwise)."""
        self.llm.llm_engine.engine_core.shutdown()

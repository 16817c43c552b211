"""The injection decoder as a vLLM model (vLLM 0.32, its encoder-decoder path).

Every touch of vLLM's internal model API lives here (layers, multimodal processor hooks,
registry), so the next vLLM upgrade is a change to this file; the public API (LLM,
SamplingParams) is used by ctxtree/kernels/vllm_engine.py. Nothing else imports vLLM.

How it maps onto vLLM:
- A request's injected K/V (kernels/inject.py RequestKV, chunk RoPE already folded into
  the keys) travel as one item of a custom multimodal modality, "context": a tensor
  [S, M*2*Hkv*Dh] (position-major; per position layer 0's key heads, then its value heads,
  then layer 1's, ...). The encoder prompt is one placeholder token that the processor
  expands to S, so vLLM's cross-attention KV cache gets S slots per request.
- vLLM fills that cache at the request's first step (encoder_outputs given) and reads it
  afterwards (K/V None): the K/V are written once per request, as the torch engine does.
- Layers 0..M-1 are vLLM's LlamaDecoderLayer with the cross block between self-attention
  and the MLP: cross_norm -> query -> attention over the request's positions (no RoPE on
  the query: kernels/inject.py folds the rotation into the keys) -> out, added to the
  residual stream.
- A request with no injected positions is sent one zero position: zero keys and zero
  values give a zero cross output (the out projection has no bias), which is what the
  torch engine computes for it; attention over zero keys is not a no-op in vLLM.

Weights: the base checkpoint in HF naming plus the adapter renamed to
`model.layers.{i}.cross_attn.{query,out,cross_norm}.weight` (vllm_engine.py writes that
directory), so vLLM's q/k/v stacking map never touches the cross block. vLLM finds this
class through ctxtree/kernels/vllm_plugin.py. The design and its pitfalls: the team's
shared notes, vllm.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import EmbeddingItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseProcessingInfo, EncDecMultiModalProcessor,
                                        PromptReplacement, PromptUpdate)
from vllm.v1.attention.backend import AttentionType

from ctxtree.kernels.vllm_engine import CONFIG_LAYERS, CONFIG_MAX_POSITIONS, MODALITY, context_width


# ---- multimodal plumbing: the "context" modality ---------------------------------------

def _layers(hf_config) -> int:
    return int(getattr(hf_config, CONFIG_LAYERS))


def _max_positions(hf_config) -> int:
    return int(getattr(hf_config, CONFIG_MAX_POSITIONS))


def _head_dim(hf_config) -> int:
    # the rule of ctxtree/kernels/config.py LlamaConfig.from_hf
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _width_of(hf_config) -> int:
    return context_width(_layers(hf_config), hf_config.num_key_value_heads, _head_dim(hf_config))


class ContextParser(MultiModalDataParser):
    """Accepts one 2-D tensor [S, width] per request under "context"; anything else is an
    error before it reaches the model (wrong shapes would otherwise crash the engine)."""

    def __init__(self, width: int, max_positions: int):
        super().__init__()
        self.width = width
        self.max_positions = max_positions

    def _parse_context(self, data) -> EmbeddingItems:
        items = [data] if isinstance(data, torch.Tensor) else list(data)
        for t in items:
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                raise ValueError(f"context must be a 2-D tensor [positions, {self.width}]")
            if not 1 <= t.shape[0] <= self.max_positions:
                raise ValueError(f"context has {t.shape[0]} positions; this engine takes 1..{self.max_positions}")
        return EmbeddingItems(items, MODALITY, expected_hidden_size=self.width)

    def _get_subparsers(self):
        return {MODALITY: self._parse_context}


class ContextProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {MODALITY: _max_positions(self.get_hf_config())}

    def get_data_parser(self) -> MultiModalDataParser:
        cfg = self.get_hf_config()
        return ContextParser(_width_of(cfg), _max_positions(cfg))


class ContextDummyInputs(BaseDummyInputsBuilder[ContextProcessingInfo]):
    """What vLLM profiles memory with: the longest context a request may carry."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        if not mm_counts.get(MODALITY, 0):
            return {}
        cfg = self.info.get_hf_config()
        return {MODALITY: torch.zeros(_max_positions(cfg), _width_of(cfg))}


class ContextProcessor(EncDecMultiModalProcessor[ContextProcessingInfo]):
    # the decoder prompt is the question prompt exactly as the torch engine runs it
    skip_decoder_start_token = True

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [0]  # one placeholder, expanded to the context's positions below

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {f"{MODALITY}_embeds": MultiModalFieldConfig.batched(MODALITY)}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs,
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        if not mm_items.get_count(MODALITY, strict=False):
            return []
        positions = mm_items.get_items(MODALITY, EmbeddingItems).get_feature_size(0)
        return [PromptReplacement(modality=MODALITY, target=[0], replacement=[0] * positions)]


# ---- the model -------------------------------------------------------------------------

class CrossBlock(nn.Module):
    """kernels/inject.py CrossAttention on vLLM layers: the query is not rotated, the
    keys and values come from the request's context as they are."""

    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = _head_dim(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.cross_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.query = ColumnParallelLinear(config.hidden_size, self.n_heads * self.head_dim, bias=bias,
                                          quant_config=quant_config, prefix=f"{prefix}.query")
        self.out = RowParallelLinear(self.n_heads * self.head_dim, config.hidden_size, bias=False,
                                     quant_config=quant_config, prefix=f"{prefix}.out")
        self.attn = CrossAttention(self.n_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.n_kv,
                                   cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
                                   attn_type=AttentionType.ENCODER_DECODER)

    def forward(self, h: torch.Tensor, keys: torch.Tensor | None, values: torch.Tensor | None) -> torch.Tensor:
        """h [T, D]; keys/values [S_new, Hkv*Dh] on a request's first step, else None -> [T, D]."""
        q, _ = self.query(self.cross_norm(h))
        out, _ = self.out(self.attn(q, keys, values))
        return out


class InjectionDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        super().__init__(vllm_config, prefix, **kwargs)
        config = vllm_config.model_config.hf_config
        self.layer_index = int(prefix.rsplit(".", 1)[-1])
        self.cross_attn = None
        if self.layer_index < _layers(config):
            self.cross_attn = CrossBlock(config, vllm_config.cache_config, vllm_config.quant_config,
                                         f"{prefix}.cross_attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """context [S_new, M, 2, Hkv*Dh]: the context of the requests starting this step."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if self.cross_attn is not None:
            stream = residual + hidden_states  # the residual stream after self-attention
            keys = values = None
            if context is not None:
                keys, values = context[:, self.layer_index, 0], context[:, self.layer_index, 1]
            residual = stream + self.cross_attn(stream, keys, values)
            hidden_states = self.post_attention_layernorm(residual)
        else:
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@MULTIMODAL_REGISTRY.register_processor(ContextProcessor, info=ContextProcessingInfo,
                                        dummy_inputs=ContextDummyInputs)
class InjectionLlamaForCausalLM(LlamaForCausalLM, SupportsMultiModal):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if getattr(config, "attention_bias", False):
            raise ValueError("the vLLM injection decoder needs a base model without attention biases "
                             "(a zero context must give a zero cross output)")
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=InjectionDecoderLayer)
        self.n_layers = _layers(config)
        self.width = _width_of(config)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=InjectionDecoderLayer):
        # LlamaModel is compiled with fixed forward arguments; the context is an extra one,
        # so the plain (uncompiled) forward runs: the engine sets enforce_eager
        return LlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        items = kwargs.get(f"{MODALITY}_embeds")
        if items is None:
            return []
        items = list(items) if not isinstance(items, torch.Tensor) or items.ndim == 3 else [items]
        dtype = self.model.embed_tokens.weight.dtype
        return [t.to(dtype) for t in items]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)  # the context never enters as token embeddings

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, encoder_outputs: list[torch.Tensor] | None = None,
                **kwargs) -> torch.Tensor:
        context = None
        if encoder_outputs:
            flat = torch.cat(list(encoder_outputs), dim=0)  # [S_new, width]
            context = flat.view(flat.shape[0], self.n_layers, 2, -1)
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, context=context)

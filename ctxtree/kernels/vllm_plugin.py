"""vLLM's plugin entry point for ctxtree (pyproject: [project.entry-points."vllm.general_plugins"]).

vLLM calls register() in every process it starts. It only names the model class; vLLM
imports ctxtree/kernels/vllm_model.py (and initialises devices) when it builds the model.
"""

from __future__ import annotations

from ctxtree.kernels.vllm_engine import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "ctxtree.kernels.vllm_model:InjectionLlamaForCausalLM")

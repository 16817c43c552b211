"""The parts of the vLLM engine that need no vLLM, tested in the main venv (the engine itself
runs against the torch engine in tests/test_vllm_engine.py, `make test-vllm`): the layout
of the "context" tensor the vLLM model slices, the model directory vLLM loads, and how
VllmDecoder.steps turns vLLM's engine steps into the torch engine's per-step rows.

The last one drives steps() with a scripted stand-in for vLLM's LLMEngine (add_request /
step / abort_request): it schedules requests late and finishes them at chosen steps,
which a real engine does only under load, so the lockstep and abort logic is tested where
it can fail."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ctxtree.kernels.generate import SamplingConfig
from ctxtree.kernels.inject import InjectionDecoder, RequestKV
from ctxtree.kernels.vllm_engine import (ARCHITECTURE, CONFIG_LAYERS, CONFIG_MAX_POSITIONS, VllmConfig,
                                         VllmDecoder, context_tensor, context_width, prepare_model_dir)


def kv(m: int, hkv: int, s: int, dh: int, seed: int = 0) -> RequestKV:
    g = torch.Generator().manual_seed(seed)
    return RequestKV(torch.randn(m, hkv, s, dh, generator=g), torch.randn(m, hkv, s, dh, generator=g),
                     torch.zeros(s, dtype=torch.long))


def test_context_tensor_holds_each_layers_keys_then_values_per_position():
    r = kv(3, 2, 5, 4)
    t = context_tensor(r)
    assert t.shape == (5, context_width(3, 2, 4)) == (5, 3 * 2 * 2 * 4)
    per_layer = t.view(5, 3, 2, -1)  # what vllm_model.py's forward does: [S, M, (K, V), Hkv*Dh]
    for layer in range(3):
        assert torch.equal(per_layer[:, layer, 0], r.keys[layer].permute(1, 0, 2).reshape(5, -1))
        assert torch.equal(per_layer[:, layer, 1], r.values[layer].permute(1, 0, 2).reshape(5, -1))
    empty = context_tensor(kv(3, 2, 0, 4))  # no context: one zero position (a zero cross output)
    assert empty.shape == (1, 48) and not empty.any()


def test_model_dir_refuses_a_base_model_with_attention_biases(tiny_ckpt, tiny_model, tmp_path):
    decoder = InjectionDecoder(tiny_model, 2)
    with pytest.raises(ValueError, match="attention biases"):  # the tiny checkpoint has q/k/v biases
        prepare_model_dir(tiny_ckpt, decoder, 64, tmp_path)


def test_model_dir_is_made_once_and_names_the_injection_fields(tiny_ckpt_no_bias, tmp_path):
    from ctxtree.kernels.weights import load_llama

    ckpt = tiny_ckpt_no_bias
    model, _ = load_llama(ckpt)
    decoder = InjectionDecoder(model, 2)
    with torch.no_grad():
        decoder.cross_attn[1].o_proj.weight.fill_(0.5)
    out = prepare_model_dir(ckpt, decoder, 128, tmp_path / "cache")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["is_encoder_decoder"] is True
    assert config[CONFIG_LAYERS] == 2 and config[CONFIG_MAX_POSITIONS] == 128
    assert (out / "model.safetensors").resolve() == (ckpt / "model.safetensors").resolve()
    weights = load_file(str(out / "ctxtree-injection.safetensors"))
    assert sorted(weights) == sorted(f"model.layers.{i}.cross_attn.{n}.weight" for i in range(2)
                                     for n in ("query", "out", "cross_norm"))
    assert torch.equal(weights["model.layers.1.cross_attn.out.weight"], decoder.cross_attn[1].o_proj.weight)
    assert prepare_model_dir(ckpt, decoder, 128, tmp_path / "cache") == out  # made once
    assert prepare_model_dir(ckpt, decoder, 256, tmp_path / "cache") != out  # another limit, another dir
    with pytest.raises(ValueError, match="copy head"):
        prepare_model_dir(ckpt, InjectionDecoder(model, 2, copy_head=True), 128, tmp_path / "cache")
    with pytest.raises(ValueError, match="upper-layer adapters"):
        prepare_model_dir(ckpt, InjectionDecoder(model, 2, upper_rank=4), 128, tmp_path / "cache")
    with pytest.raises(ValueError, match="reading layers"):
        prepare_model_dir(ckpt, InjectionDecoder(model, 2, reading_from=1), 128, tmp_path / "cache")


# ---- steps() against a scripted engine ---------------------------------------------------

@dataclass
class ScriptedEngine:
    """add_request/step/abort_request/has_unfinished_requests of vLLM's LLMEngine. plans[i]:
    the tokens request i makes, starting at engine step starts[i], one a step."""
    plans: list[list[int]]
    starts: list[int]
    added: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    step_no: int = 0

    def add_request(self, rid, request, params) -> None:
        self.added.append(rid)

    def has_unfinished_requests(self) -> bool:
        return any(self._made(i) < len(p) for i, p in enumerate(self.plans) if self.added[i] not in self.aborted)

    def _made(self, i: int) -> int:
        return max(0, min(len(self.plans[i]), self.step_no - self.starts[i]))

    def step(self):
        self.step_no += 1
        outs = []
        for i, plan in enumerate(self.plans):
            made = self._made(i)
            if made and self.step_no - self.starts[i] <= len(plan) and self.added[i] not in self.aborted:
                outs.append(SimpleNamespace(request_id=self.added[i], finished=made == len(plan),
                                            outputs=[SimpleNamespace(token_ids=plan[:made], finish_reason=None)]))
        return outs

    def abort_request(self, ids) -> None:
        self.aborted += ids


def scripted_decoder(engine: ScriptedEngine) -> VllmDecoder:
    decoder = VllmDecoder.__new__(VllmDecoder)  # no vLLM here: the engine is the scripted one
    decoder.config, decoder.n_layers = VllmConfig(max_context_positions=16), 1
    decoder.llm = SimpleNamespace(llm_engine=engine)
    return decoder


def run(engine: ScriptedEngine, n: int, max_tokens: int = 8):
    return list(scripted_decoder(engine).steps([[1]] * n, [kv(1, 1, 2, 4)] * n, SamplingConfig(max_tokens=max_tokens),
                                               (9,)))


@pytest.fixture(autouse=True)
def sampling_params(monkeypatch):
    """steps() imports vLLM's SamplingParams; without vLLM a plain record stands in."""
    import importlib.util
    import sys

    if importlib.util.find_spec("vllm") is None:
        monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))


def test_rows_stream_in_lockstep_and_stop_after_their_last_token():
    # row 1 starts two engine steps late and stops early (9 is its stop token)
    engine = ScriptedEngine(plans=[[11, 12, 13, 14], [21, 9]], starts=[0, 2])
    steps = run(engine, 2)
    assert steps == [[11, 21], [12, 9], [13, None], [14, None]]
    assert not engine.aborted  # every request finished in vLLM


def test_closing_the_stream_early_aborts_only_what_is_still_running():
    engine = ScriptedEngine(plans=[[11, 12, 13, 14, 15], [21]], starts=[0, 0])
    decoder = scripted_decoder(engine)
    it = decoder.steps([[1], [1]], [kv(1, 1, 2, 4)] * 2, SamplingConfig(max_tokens=8), (9,))
    assert next(it) == [11, 21]
    it.close()
    assert engine.aborted == [engine.added[0]]  # row 1 had finished


def test_a_request_beyond_the_limits_is_refused_before_anything_reaches_vllm():
    engine = ScriptedEngine(plans=[[11]], starts=[0])
    decoder = scripted_decoder(engine)
    with pytest.raises(ValueError, match="at most 16"):
        decoder.generate([[1]], [kv(1, 1, 17, 4)], SamplingConfig(max_tokens=2))
    with pytest.raises(ValueError, match="layers"):
        decoder.check([1], kv(2, 1, 3, 4), SamplingConfig(max_tokens=2))
    assert engine.added == []

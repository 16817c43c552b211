"""The injection decoder: identity at init, context-dependent once trained, and
independent of how requests are batched."""

from __future__ import annotations

import pytest
import torch

from ctxtree.kernels.compressor import route_query
from ctxtree.kernels.generate import SamplingConfig, generate, left_pad
from ctxtree.kernels.inject import AdapterError, InjectionDecoder, batch_context, load_adapter, save_adapter
from ctxtree.kernels.tree import TreeConfig, build_tree, search

CFG = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4, codec="fp32")


def make_trees(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [build_tree(model, torch.randint(3, 97, (n,), generator=g), CFG) for n in lengths]


def trained(model, seed=0, copy_head=False, upper=False, reading=False) -> InjectionDecoder:
    """A decoder with non-zero injection weights, as training would leave it."""
    dec = InjectionDecoder(model, 2, copy_head=copy_head, upper_rank=4 if upper else 0,
                           reading_from=1 if reading else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in dec.cross_attn:
            block.o_proj.weight.copy_(torch.randn(block.o_proj.weight.shape, generator=g) * 0.2)
        if upper:
            for w in (dec.upper.q_up, dec.upper.v_up):
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        if copy_head:
            dec.copy_head.gate.bias.fill_(0.0)  # half the mass on the pointer
            dec.copy_head.gate.weight.copy_(torch.randn(dec.copy_head.gate.weight.shape, generator=g) * 0.1)
    return dec.eval()


def request(dec, trees, q_seed=0):
    g = torch.Generator().manual_seed(q_seed)
    route = route_query(dec.base, torch.randn(64, generator=g), torch.randint(3, 97, (6,), generator=g).tolist())
    selections = [search(t, route) for t in trees]
    return dec.request_kv(trees, selections)


def test_untrained_decoder_equals_base_model_exactly(tiny_model):
    dec = InjectionDecoder(tiny_model, 2).eval()
    trees = make_trees(tiny_model, [100, 45])
    ctx = batch_context([request(dec, trees)])
    ids = torch.randint(3, 97, (1, 20))
    pos = torch.arange(20)[None]
    assert torch.equal(dec(ids, pos, context=ctx), tiny_model(ids, pos))


def test_trained_output_depends_on_the_injected_kv(tiny_model):
    dec = trained(tiny_model)
    ids, pos = torch.randint(3, 97, (1, 20)), torch.arange(20)[None]
    a = dec(ids, pos, context=batch_context([request(dec, make_trees(tiny_model, [100], seed=1))]))
    b = dec(ids, pos, context=batch_context([request(dec, make_trees(tiny_model, [100], seed=2))]))
    assert (a - b).abs().max() > 1e-3
    assert (a - tiny_model(ids, pos)).abs().max() > 1e-3
    # chunk-level RoPE changes what the decoder sees; "none" is a different model
    dec_none = trained(tiny_model)
    dec_none.cross_rope = "none"
    trees = make_trees(tiny_model, [100], seed=1)
    c = dec_none(ids, pos, context=batch_context([request(dec_none, trees)]))
    assert (a - c).abs().max() > 1e-4


VARIANTS = ["cross-attention", "copy head", "upper adapters", "reading layers"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_mixed_requests_equals_requests_one_by_one(tiny_model, variant):
    copy_head = variant == "copy head"
    dec = trained(tiny_model, copy_head=copy_head, upper=variant == "upper adapters",
                  reading=variant == "reading layers")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19, 20]]
    contexts = [request(dec, make_trees(tiny_model, [100, 45], seed=3)),
                request(dec, make_trees(tiny_model, [20], seed=4), q_seed=1),
                request(dec, [])]                       # a request with no documents at all
    batch = left_pad(prompts)
    together = dec(batch.input_ids, batch.positions, batch.token_valid, context=batch_context(contexts))
    for row, (p, kv) in enumerate(zip(prompts, contexts)):
        alone = dec(torch.tensor([p]), torch.arange(len(p))[None], context=batch_context([kv]))
        torch.testing.assert_close(together[row, -len(p):], alone[0], atol=1e-5, rtol=1e-5)
    # the request without documents is exactly the base model (as log-probabilities with a copy head)
    base = tiny_model(torch.tensor([prompts[2]]), torch.arange(5)[None])[0]
    torch.testing.assert_close(together[2, -5:], torch.log_softmax(base, -1) if copy_head else base,
                               atol=1e-5, rtol=1e-5)
    # generation: the same tokens batched and alone (greedy and seeded sampling)
    for sampling in (SamplingConfig(max_tokens=8), SamplingConfig(max_tokens=8, temperature=0.8, top_p=0.9)):
        gens = [torch.Generator().manual_seed(10 + r) for r in range(3)]
        batched = list(zip(*generate(dec, prompts, batch_context(contexts), sampling, generators=gens)))
        for row, (p, kv) in enumerate(zip(prompts, contexts)):
            alone = [s[0] for s in generate(dec, [p], batch_context([kv]), sampling,
                                            generators=[torch.Generator().manual_seed(10 + row)])]
            assert list(batched[row]) == alone


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_of_the_context_does_not_matter(tiny_model, variant):
    dec = trained(tiny_model, copy_head=variant == "copy head", upper=variant == "upper adapters",
                  reading=variant == "reading layers")
    kv = request(dec, make_trees(tiny_model, [60], seed=5))
    longer = request(dec, make_trees(tiny_model, [200], seed=6))
    ids, pos = torch.randint(3, 97, (1, 10)), torch.arange(10)[None]
    alone = dec(ids, pos, context=batch_context([kv]))
    padded = dec(ids.repeat(2, 1), pos.repeat(2, 1), context=batch_context([kv, longer]))
    assert kv.keys.shape[2] < longer.keys.shape[2]
    if variant == "reading layers":
        assert kv.reading_keys.shape[2] < longer.reading_keys.shape[2]
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_adapter_round_trip_and_refusal(tiny_model, tmp_path):
    dec = trained(tiny_model, seed=9)
    save_adapter(dec, tmp_path / "ad", "digest-a", {"tree_config": CFG.to_dict()})
    back = load_adapter(tiny_model, tmp_path / "ad", "digest-a")
    for k, v in dec.adapter_state().items():
        assert torch.equal(back.adapter_state()[k], v)
    with pytest.raises(AdapterError, match="trained for base weights"):
        load_adapter(tiny_model, tmp_path / "ad", "digest-b")
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load_adapter(tiny_model, tmp_path, "digest-a")


def test_copy_head_mixes_a_distribution_that_can_only_copy_the_documents_tokens(tiny_model):
    dec = trained(tiny_model, copy_head=True)
    trees = make_trees(tiny_model, [100], seed=7)
    kv = request(dec, trees)
    ids, pos = torch.randint(3, 97, (1, 12)), torch.arange(12)[None]
    mixed = dec(ids, pos, context=batch_context([kv]))
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(1, 12))  # a distribution at every position
    # gate shut: exactly the decoder without a copy head (same cross-attention weights)
    with torch.no_grad():
        dec.copy_head.gate.weight.zero_()
        dec.copy_head.gate.bias.fill_(-80.0)
    plain = InjectionDecoder(tiny_model, 2)
    plain.cross_attn.load_state_dict(dec.cross_attn.state_dict())
    torch.testing.assert_close(dec(ids, pos, context=batch_context([kv])),
                               torch.log_softmax(plain.eval()(ids, pos, context=batch_context([kv])), -1))
    # gate open: all the mass is on tokens the injected positions hold, and greedy decoding copies them
    with torch.no_grad():
        dec.copy_head.gate.bias.fill_(80.0)
    with torch.no_grad():
        out = dec(ids, pos, context=batch_context([kv])).exp()
    in_doc = torch.zeros(out.shape[-1], dtype=torch.bool)
    in_doc[kv.token_ids] = True
    assert float(out[..., ~in_doc].sum()) < 1e-6
    steps = [s[0] for s in generate(dec, [ids[0].tolist()], batch_context([kv]), SamplingConfig(max_tokens=6))]
    assert all(in_doc[t] for t in steps)


def test_copy_head_adapter_round_trip(tiny_model, tmp_path):
    dec = trained(tiny_model, seed=4, copy_head=True)
    save_adapter(dec, tmp_path / "ad", "digest-a")
    back = load_adapter(tiny_model, tmp_path / "ad", "digest-a")
    assert back.copy_head is not None
    for k, v in dec.adapter_state().items():
        assert torch.equal(back.adapter_state()[k], v)
    # weights the config does not declare are refused, not dropped
    meta = (tmp_path / "ad" / "adapter.json")
    meta.write_text(meta.read_text().replace('"copy_head": true', '"copy_head": false'))
    with pytest.raises(AdapterError, match="copy_head"):
        load_adapter(tiny_model, tmp_path / "ad", "digest-a")


def test_extending_an_adapter_keeps_what_it_computes_until_new_layers_learn(tiny_model, tmp_path):
    from ctxtree.kernels.inject import extend_injection

    one = InjectionDecoder(tiny_model, 1)
    with torch.no_grad():
        one.cross_attn[0].o_proj.weight.normal_(std=0.2)
    deeper = extend_injection(one.eval(), 2)
    assert deeper.n_layers == 2 and not deeper.training
    trees = make_trees(tiny_model, [100, 45])
    ctx = batch_context([request(deeper, trees)])
    ids, pos = torch.randint(3, 97, (1, 20)), torch.arange(20)[None]
    assert torch.equal(deeper(ids, pos, context=ctx), one(ids, pos, context=ctx))
    with torch.no_grad():  # the new layer reads the context once it has learnt anything
        deeper.cross_attn[1].o_proj.weight.normal_(std=0.2)
    assert (deeper(ids, pos, context=ctx) - one(ids, pos, context=ctx)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot extend"):
        extend_injection(deeper, 1)
    with pytest.raises(ValueError, match="copy head"):
        extend_injection(InjectionDecoder(tiny_model, 1, copy_head=True), 2)


def test_upper_adapters_start_as_nothing_then_change_the_answer_and_round_trip(tiny_model, tmp_path):
    plain = trained(tiny_model, seed=2)
    with_upper = trained(tiny_model, seed=2)
    with_upper.add_upper(4)
    assert set(with_upper.adapter_state()) - set(plain.adapter_state()) == {
        "upper.q_down", "upper.q_up", "upper.v_down", "upper.v_up"}
    trees = make_trees(tiny_model, [100])
    ctx = batch_context([request(plain, trees)])
    ids, pos = torch.randint(3, 97, (1, 12)), torch.arange(12)[None]
    assert torch.equal(with_upper(ids, pos, context=ctx), plain(ids, pos, context=ctx))  # zero at start
    with torch.no_grad():
        with_upper.upper.v_up.normal_(std=0.3)
    assert (with_upper(ids, pos, context=ctx) - plain(ids, pos, context=ctx)).abs().max() > 1e-3
    # their value deltas enter the KV cache: decoding step by step equals one full pass
    from ctxtree.kernels.llama import KVCache
    cache = KVCache.allocate(tiny_model.cfg, 1, 12, tiny_model.dtype)
    with_upper(ids[:, :8], pos[:, :8], cache=cache, context=ctx)
    stepped = with_upper(ids[:, 8:], pos[:, 8:], cache=cache, context=ctx)
    torch.testing.assert_close(stepped, with_upper(ids, pos, context=ctx)[:, 8:], atol=1e-5, rtol=1e-5)
    # only layers above the injection layers have them: the compressor's layers stay the base model's
    assert with_upper.upper.first == 2 and with_upper.upper.q_up.shape[0] == tiny_model.cfg.num_hidden_layers - 2
    save_adapter(with_upper, tmp_path / "ad", "digest-a")
    back = load_adapter(tiny_model, tmp_path / "ad", "digest-a")
    assert back.upper is not None and back.upper.rank == 4
    assert torch.equal(back(ids, pos, context=ctx), with_upper(ids, pos, context=ctx))
    with pytest.raises(ValueError, match="rank 4, not 8"):
        back.add_upper(8)


def test_reading_layers_read_the_injected_chunks_as_if_their_text_preceded_the_prompt(tiny_model, tmp_path):
    """With reading layers from 0 and no trained weights, the decoder given a request's
    injected chunks is the base model with those chunks' text (documents and chunks in
    order, the left-out chunk skipped) standing right before the prompt: same logits at
    every prompt position. Decoding step by step through the KV cache equals one pass."""
    from ctxtree.kernels.llama import KVCache
    from ctxtree.kernels.reading import reading_kv
    from ctxtree.kernels.tree import NOT_INJECTED

    g = torch.Generator().manual_seed(7)
    first_doc, second_doc = torch.randint(3, 97, (64,), generator=g), torch.randint(3, 97, (20,), generator=g)
    trees = [build_tree(tiny_model, first_doc, CFG), build_tree(tiny_model, second_doc, CFG)]
    selected = [torch.tensor([[NOT_INJECTED] * 4, [2, 4, 7, 8]]), torch.tensor([[2, 4, 7, 8]])]  # chunk 1 of doc 0
    text = torch.cat([first_doc[32:], second_doc])  # what the reading layers must see: 32 + 20 tokens
    n = tiny_model.cfg.num_hidden_layers
    keys, values = reading_kv(tiny_model, trees, selected, first=1)
    assert keys.shape == values.shape == (n - 1, 2, 52, 16)  # layers 1..3, every token read
    ids = torch.randint(3, 97, (1, 10), generator=g)
    plain = InjectionDecoder(tiny_model, 2, reading_from=0).eval()
    ctx = batch_context([plain.request_kv(trees, selected)])
    with_text = tiny_model(torch.cat([text, ids[0]])[None], torch.arange(62)[None])[:, 52:]
    torch.testing.assert_close(plain(ids, torch.arange(10)[None], context=ctx), with_text, atol=1e-4, rtol=1e-4)
    # a reading decoder with an untrained cross-attention: the context changes the answer
    tree, selected = trees[1], selected[1]
    dec = InjectionDecoder(tiny_model, 2, reading_from=1).eval()
    ctx = batch_context([dec.request_kv([tree], [selected])])
    ids, pos = torch.randint(3, 97, (1, 10)), torch.arange(10)[None]
    full = dec(ids, pos, context=ctx)
    assert (full - tiny_model(ids, pos)).abs().max() > 1e-3
    cache = KVCache.allocate(tiny_model.cfg, 1, 10, tiny_model.dtype)
    dec(ids[:, :6], pos[:, :6], cache=cache, context=ctx)
    torch.testing.assert_close(dec(ids[:, 6:], pos[:, 6:], cache=cache, context=ctx), full[:, 6:],
                               atol=1e-5, rtol=1e-5)
    # the setting is saved with the adapter and can be overridden on load
    save_adapter(dec, tmp_path / "ad", "digest-r")
    assert load_adapter(tiny_model, tmp_path / "ad", "digest-r").reading_from == 1
    assert load_adapter(tiny_model, tmp_path / "ad", "digest-r", reading_from=None).reading_from is None
    with pytest.raises(ValueError, match="first reading layer"):
        InjectionDecoder(tiny_model, 2, reading_from=n)
    # more injected text than the model's window (512 tokens here) is refused, not read
    long_tree = make_trees(tiny_model, [600])[0]
    every = torch.tensor([[2, 4, 7, 8]] * long_tree.n_chunks)
    with pytest.raises(ValueError, match="more than the model's window"):
        dec.request_kv([long_tree], [every])
    with pytest.raises(ValueError, match="no reading K/V"):
        dec(ids, pos, context=batch_context([InjectionDecoder(tiny_model, 2).request_kv([tree], [selected])]))

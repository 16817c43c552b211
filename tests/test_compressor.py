"""The compressor's K/V and routing vectors are exactly the base model's own."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from ctxtree.kernels.compressor import compress_nodes, query_vector


@pytest.mark.parametrize("n_layers", [1, 3])
def test_kv_and_routes_equal_transformers_cache(tiny_ckpt, tiny_model, n_layers):
    hf = LlamaForCausalLM.from_pretrained(str(tiny_ckpt)).eval()
    nodes = [torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 9, 30)]
    out = compress_nodes(tiny_model, nodes, n_layers)
    assert len(out.keys) == n_layers and out.routes.shape == (3, 64)
    for row, node in enumerate(nodes):
        with torch.no_grad():
            res = hf(node[None], use_cache=True, output_hidden_states=True)
        n = node.numel()
        for i in range(n_layers):
            want_k = res.past_key_values.layers[i].keys[0]   # [Hkv, n, Dh], rotated
            want_v = res.past_key_values.layers[i].values[0]
            torch.testing.assert_close(out.keys[i][row, :, :n], want_k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.values[i][row, :, :n], want_v, atol=1e-5, rtol=1e-5)
        # routing vector: final norm of layer 0's output at the node's last token
        want_route = hf.model.norm(res.hidden_states[1][0, -1])
        torch.testing.assert_close(out.routes[row], want_route, atol=1e-5, rtol=1e-5)


def test_query_vector_is_layer0_of_the_question(tiny_model):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    q = query_vector(tiny_model, ids, torch.arange(6)[None], None, torch.tensor([3]))
    alone = compress_nodes(tiny_model, [ids[0, :4]], 1).routes[0]
    torch.testing.assert_close(q[0], alone, atol=1e-6, rtol=1e-6)


def test_smollm2_kv_equal_transformers(smollm_dir, smollm_runtime):
    hf = LlamaForCausalLM.from_pretrained(str(smollm_dir), dtype=torch.float32).eval()
    node = torch.tensor(smollm_runtime.tokenizer("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"])
    out = compress_nodes(smollm_runtime.model, [node], 4)
    with torch.no_grad():
        res = hf(node[None], use_cache=True)
    for i in range(4):
        torch.testing.assert_close(out.keys[i][0], res.past_key_values.layers[i].keys[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.values[i][0], res.past_key_values.layers[i].values[0], atol=1e-4, rtol=1e-4)


def test_empty_node_is_refused(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        compress_nodes(tiny_model, [torch.tensor([], dtype=torch.long)], 2)

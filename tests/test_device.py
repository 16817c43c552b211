"""Device placement, one place (ctxtree/runtime.py): the model and the injection weights go
where the process has a GPU (Ray hides GPUs from actors that reserved none), trees stay on
the CPU; the compress job, the Serve config and the CLI pass a device through. This
machine has no GPU: the default is checked with torch's GPU probe faked, and the test
marked `cuda` runs only where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from ctxtree.kernels.tree import TreeConfig, build_tree
from ctxtree.runtime import default_device, load_runtime, resolve_device

TINY_TREE = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4)


def test_default_device_follows_the_gpus_this_process_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu") and resolve_device(None) == torch.device("cpu")


def test_bad_or_missing_devices_are_clear_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu-please")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"sees 0 GPU\(s\)"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"sees 1 GPU\(s\)"):
        resolve_device("cuda:1")


def test_the_runtime_places_model_and_decoder_on_the_device(smollm_dir):
    rt = load_runtime(smollm_dir, device="cpu")
    assert rt.adapter_dir is not None  # the shipped adapter's weights too
    assert rt.model.device == torch.device("cpu")
    assert {p.device.type for p in rt.decoder.parameters()} == {"cpu"}


def test_every_entry_point_passes_the_device_through():
    from ctxtree.pipelines.compress import build_parser, job_from_args
    from ctxtree.serve.decoder import ServeArgs

    assert ServeArgs(store="s", device="cuda:0").service_config().device == "cuda:0"
    assert ServeArgs(store="s").service_config().device is None  # the replica's GPU if Ray gave it one
    job = job_from_args(build_parser("compress").parse_args(["docs", "--device", "cpu"]))
    assert job.device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_model_runs_there_and_trees_stay_on_the_cpu(smollm_dir):
    from ctxtree.kernels.generate import SamplingConfig
    from ctxtree.kernels.inject import batch_context
    from ctxtree.kernels.tree import search_documents
    from ctxtree.kernels.generate import generate

    gpu, cpu = load_runtime(smollm_dir, TINY_TREE), load_runtime(smollm_dir, TINY_TREE, device="cpu")
    assert gpu.model.device.type == "cuda"
    ids = torch.randint(3, 5000, (100,), generator=torch.Generator().manual_seed(0))
    tree = build_tree(gpu.model, ids, TINY_TREE)
    assert tree.keys.device.type == "cpu" and tree.key_scales.device.type == "cpu"
    ref = build_tree(cpu.model, ids, TINY_TREE)
    assert (tree.keys.int() - ref.keys.int()).abs().max() <= 1  # int8 codes: at most one rounding step apart
    selection = [torch.tensor([[2, 4, 7, 8]] * tree.n_chunks)]
    context = batch_context([gpu.decoder.request_kv([tree], selection)])
    assert context.keys.device.type == "cuda"
    steps = list(generate(gpu.decoder, [[5, 6, 7]], context, SamplingConfig(max_tokens=4)))
    assert len(steps) == 4 and all(isinstance(s[0], int) for s in steps)

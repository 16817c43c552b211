"""Loading checkpoints: HF safetensors directories, and GGUF files through
transformers' GGUF conversion, converted once into a cached safetensors directory
(the GGUF path dequantizes every tensor and takes ~25 s; the cache loads in seconds).

Also the content digests that go into the model fingerprint (fingerprint.py):
they hash tensor bytes and tokenizer contents, never Python's `hash()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ctxtree.kernels.config import LlamaConfig
from ctxtree.kernels.llama import Llama, rope_inv_freq

# Non-parameter entries some checkpoints carry; recomputed, never loaded.
_IGNORED_KEYS = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as a LLaMA-family model."""


def read_config(ckpt_dir: Path) -> LlamaConfig:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint directory: no config.json")
    return LlamaConfig.from_hf(json.loads(path.read_text()))


def read_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of *.safetensors in the directory, names without the `model.` prefix."""
    files = sorted(Path(ckpt_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {ckpt_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            name = name.removeprefix("model.")
            if not name.endswith(_IGNORED_KEYS):
                state[name] = tensor
    return state


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(weights: str, cfg: LlamaConfig) -> str:
    """The base model's identity: its weights and the config that decides how they are
    used (RoPE, norms, biases), which change a tree's bytes as much as the weights do."""
    doc = json.dumps({"weights": weights, "config": dataclasses.asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def read_checkpoint(ckpt_dir: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor], str]:
    """(config, weights, model digest) of a checkpoint directory, without building a model."""
    cfg = read_config(ckpt_dir)
    state = read_state_dict(ckpt_dir)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    return cfg, state, model_digest(weights_digest(state), cfg)


def load_llama(ckpt_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[Llama, str]:
    """Load a checkpoint directory into our Llama; returns (model in eval mode, model digest)."""
    cfg, state, digest = read_checkpoint(ckpt_dir)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match the config: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for name, tensor in state.items():
        want = model.state_dict()[name].shape
        if tensor.shape != want:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(want)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    return model.eval().requires_grad_(False), digest


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def make_dir_once(target: Path, fill: Callable[[Path], None]) -> Path:
    """`target`, a directory whose config.json says it is whole: made by fill(tmp) in a
    temporary sibling and renamed into place, so a crash mid-way never leaves a half-made
    directory that later loads would trust; if it exists, it is returned as it is."""
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process made it first: theirs is fine
    return target


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file once into `cache_dir/<stem>-<sha>/` (config, safetensors, tokenizer).

    Written to a temporary directory and renamed into place, so a crash mid-way never
    leaves a half-converted checkpoint that later loads would trust.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise CheckpointError(f"GGUF file not found: {gguf_file}")
    target = Path(cache_dir) / f"{gguf_file.stem}-{file_sha256(gguf_file)[:16]}"

    def write(tmp: Path) -> None:
        # transformers is only needed here, for the one-time GGUF dequantization.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models, so write the dequantized weights ourselves.
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tok.save_pretrained(str(tmp))

    return make_dir_once(target, write)


def prepare_checkpoint(path: Path, cache_dir: Path) -> Path:
    """A checkpoint directory for `path`: itself if it is one, else its cached GGUF conversion."""
    path = Path(path)
    if path.is_dir():
        read_config(path)  # fail early with a clear message
        return path
    if path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    raise CheckpointError(f"{path} is neither a checkpoint directory nor a .gguf file")


def load_tokenizer(ckpt_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt_dir))


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides tokenization: the BPE model (vocab, merges), the
    normalizer and pre-tokenizer, and the added tokens; not serializer details."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = dict(spec.get("model") or {})
    # tokenizers versions serialize merges as "a b" strings or as ["a", "b"] pairs
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    model = {k: model.get(k) for k in ("type", "vocab", "merges", "unk_token", "byte_fallback",
                                        "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk")}
    added = [{k: t.get(k) for k in ("id", "content", "special")} for t in spec.get("added_tokens") or []]
    parts = {"model": model, "added_tokens": added,
             "normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

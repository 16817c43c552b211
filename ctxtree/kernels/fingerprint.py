"""The model fingerprint (design.md "Contracts"): one hex digest naming everything
that decides a tree's bytes — the base weights, the tokenizer and the compressor
config (M, L, h, p, dtype, codec). Trees built under one fingerprint are refused by
a decoder with another. sha256 over canonical JSON: identical in every process and
on every machine (never Python's `hash()`, which is salted per process).
"""

from __future__ import annotations

import hashlib
import json

from ctxtree.kernels.tree import TreeConfig

FINGERPRINT_VERSION = 2  # 2: trees store their token ids (token-match search)


def model_fingerprint(weights_digest: str, tokenizer_digest: str, tree: TreeConfig) -> str:
    doc = {"v": FINGERPRINT_VERSION, "weights": weights_digest, "tokenizer": tokenizer_digest,
           "tree": tree.to_dict()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

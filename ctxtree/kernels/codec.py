"""Stored K/V codecs: how a tree's keys and values are kept (in storage and in a replica's
tree cache) and read back when a request injects them.

Float codecs (bf16, fp16, fp32) are a plain cast. Quantized codecs (int8, fp8 = e4m3) keep
one 8-bit code per value and one bf16 scale per (layer, head, position), i.e. per Dh = 64
values: 3% on top of the codes, half the bytes of bf16. Decoding happens only for the
positions a request injects (kernels/tree.py gather_nodes), so a tree cache holds twice
as many int8 trees as bf16 ones.

Why per (layer, head, position) and why not 4 bits: measured on 30 held-out 4K lookups
with the shipped adapter (docs/quality.md, "Stored K/V codecs"): bf16 13 right, int8 14,
fp8 15 (relative error of the K/V 0.9% and 2.3%), but int6 11, int5 8 and every 4-bit
scheme tried 4-11 (per-head, groups of 32, asymmetric, per-channel keys, a random
Hadamard rotation first): the decoder copies a value digit by digit from the injected
positions, and a few percent of noise on K/V changes which digit it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_DTYPE = torch.bfloat16  # the range of fp32: no group is too small to scale; precision does
# not matter, encoding divides by the rounded scale


@dataclass(frozen=True)
class Codec:
    name: str
    dtype: torch.dtype         # element dtype of the stored K/V codes
    routes_dtype: torch.dtype  # routing vectors (1% of a tree; kept as floats)
    code_max: float | None     # quantized: the largest code magnitude; None: a plain cast

    @property
    def quantized(self) -> bool:
        return self.code_max is not None


CODECS = {c.name: c for c in (
    Codec("fp32", torch.float32, torch.float32, None),
    Codec("fp16", torch.float16, torch.float16, None),
    Codec("bf16", torch.bfloat16, torch.bfloat16, None),
    Codec("int8", torch.int8, torch.bfloat16, 127.0),
    Codec("fp8", torch.float8_e4m3fn, torch.bfloat16, 448.0),  # e4m3's largest finite value
)}


def encode_kv(x: Tensor, codec: Codec) -> tuple[Tensor, Tensor | None]:
    """x [..., Dh] (any float dtype) -> codes [..., Dh] in codec.dtype and scales [...] in
    SCALE_DTYPE (None for a float codec). decode_kv(codes, scales) ~= x."""
    if not codec.quantized:
        return x.to(codec.dtype), None
    x = x.float()
    absmax = x.abs().amax(dim=-1, keepdim=True)  # [...,1]
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"cannot encode non-finite K/V values with codec {codec.name}")
    # The scale is rounded to its stored dtype first, so encoding divides by exactly the
    # scale decoding multiplies by; an all-zero group gets scale 1 (its codes are 0).
    scale = (absmax / codec.code_max).to(SCALE_DTYPE)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scaled = x / scale.float()
    if codec.dtype == torch.int8:
        codes = scaled.round().clamp(-codec.code_max, codec.code_max).to(torch.int8)
    else:
        codes = scaled.clamp(-codec.code_max, codec.code_max).to(codec.dtype)
    return codes, scale.squeeze(-1)


def decode_kv(codes: Tensor, scales: Tensor | None) -> Tensor:
    """Inverse of encode_kv: float32 values for a quantized codec, the codes unchanged for a
    float one (callers cast to their compute dtype)."""
    if scales is None:
        return codes
    return codes.float() * scales.float().unsqueeze(-1)

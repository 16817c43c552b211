"""The model fingerprint and weight digests are the same in every process and change
with anything that changes a tree's bytes."""

from __future__ import annotations

import os
import subprocess
import sys

from ctxtree.kernels.fingerprint import model_fingerprint
from ctxtree.kernels.tree import TreeConfig
from ctxtree.kernels.weights import load_llama
from tests.conftest import REPO, save_tiny

SCRIPT = """
import sys
from ctxtree.runtime import load_runtime
from ctxtree.kernels.tree import TreeConfig
rt = load_runtime(__import__("pathlib").Path(sys.argv[1]), TreeConfig(n_layers=2))
print(rt.fingerprint)
"""


def test_same_fingerprint_in_processes_with_different_hash_seeds(smollm_dir):
    outs = []
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm_dir)], env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        outs.append(res.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1] and len(outs[0]) == 64


def test_fingerprint_changes_with_weights_tokenizer_and_config(tmp_path):
    _, d0 = load_llama(save_tiny(tmp_path / "a", seed=0))
    _, d0_again = load_llama(save_tiny(tmp_path / "b", seed=0))
    _, d1 = load_llama(save_tiny(tmp_path / "c", seed=1))
    assert d0 == d0_again and d0 != d1
    # same weights, another RoPE base: a different model, whose trees differ
    cfg = tmp_path / "b" / "config.json"
    cfg.write_text(cfg.read_text().replace('"rope_theta": 10000.0', '"rope_theta": 20000.0'))
    _, d0_theta = load_llama(tmp_path / "b")
    assert d0_theta != d0
    base = model_fingerprint(d0, "tok", TreeConfig())
    assert base == model_fingerprint(d0, "tok", TreeConfig())
    assert len({base, model_fingerprint(d1, "tok", TreeConfig()), model_fingerprint(d0, "tok2", TreeConfig()),
                model_fingerprint(d0, "tok", TreeConfig(keep=16)),
                model_fingerprint(d0, "tok", TreeConfig(codec="fp16"))}) == 5


def test_fingerprint_without_building_the_model_equals_the_runtimes(smollm_dir, smollm_runtime):
    """The compress driver names the store's trees by fingerprint_of, the actors by the
    runtime they load: the two must agree, for every tree setting."""
    from ctxtree.runtime import fingerprint_of

    assert fingerprint_of(smollm_dir, smollm_runtime.tree_config) == smollm_runtime.fingerprint
    assert fingerprint_of(smollm_dir, TreeConfig(chunk_len=128)) != smollm_runtime.fingerprint

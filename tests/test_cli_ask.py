"""`ctxtree ask` answers about a real multi-page text with the default model."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from ctxtree.kernels.tree import TreeConfig
from tests.conftest import REPO

SAMPLE = REPO / "samples" / "GPL-3.txt"


def ctxtree(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ctxtree.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def answer_of(stdout: str) -> str:
    return stdout.split("A: ", 1)[1].split("\ntimings:", 1)[0].strip()


def test_ask_answers_about_a_real_document(smollm_dir):
    # the default decoder: the shipped adapter, a lookup specialist (README, docs/quality.md);
    # its quality is measured by tests/test_quality.py, here the command's output is
    res = ctxtree("ask", "--doc", str(SAMPLE), "--question", "Who may copy and distribute this license?",
                  "--max-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert answer_of(res.stdout), res.stdout
    assert "time to first token" in res.stdout and "tokens/s" in res.stdout
    built = re.search(r"tree build: GPL-3.txt: (\d+) tokens, (\d+) chunks", res.stderr)
    assert built, res.stderr
    n_tokens, n_chunks = int(built[1]), int(built[2])
    assert n_chunks == math.ceil(n_tokens / TreeConfig().chunk_len) and n_chunks >= 8
    # the search report lists, per injected chunk (the first 8), h+1 = 4 node ranges inside
    # the document; with chunk selection (the adapter's top_chunks) it says how many were left out
    left_out = re.search(rf"GPL-3.txt: (\d+) of {n_chunks} chunks not injected \(top chunks: (\d+)\)", res.stdout)
    injected = n_chunks - int(left_out[1]) if left_out else n_chunks
    if left_out:
        assert injected == int(left_out[2])  # one document: exactly top_chunks of its chunks
    report = [line for line in res.stdout.splitlines() if line.strip().startswith("GPL-3.txt chunk")]
    assert len(report) == min(injected, 8) and all(line.count("-") >= 4 for line in report)
    if injected > 8:
        assert f"GPL-3.txt: ... {injected - 8} more chunks" in res.stdout


def test_ask_with_reading_layers_answers_in_words(smollm_dir):
    # reading layers without trained weights (docs/quality.md "Reading layers"): the two
    # chunks search keeps, read at full depth, and the base model answers from them
    res = ctxtree("ask", "--doc", str(SAMPLE), "--question", "Who may copy and distribute this license?",
                  "--adapter", "none", "--reading-from", "0", "--max-tokens", "32")
    assert res.returncode == 0, res.stderr
    answer = answer_of(res.stdout)
    assert len(re.findall(r"[A-Za-z]{3,}", answer)) >= 5, answer
    assert "licen" in answer.lower() or "copy" in answer.lower(), answer
    # the default bound on the chunks read: two of the document's chunks
    read = re.search(r"GPL-3.txt: (\d+) of (\d+) chunks not injected \(top chunks: 2\)", res.stdout)
    assert read and int(read[2]) - int(read[1]) == 2, res.stdout
    res = ctxtree("ask", "--doc", str(SAMPLE), "--question", "x", "--adapter", "none", "--reading-from", "0",
                  "--top-chunks", "0")
    assert res.returncode == 2 and "need top_chunks >= 1" in res.stderr
    res = ctxtree("ask", "--doc", str(SAMPLE), "--question", "x", "--reading-from", "top")
    assert res.returncode == 2 and "expected a layer number, 'none' or 'as-trained'" in res.stderr


def test_ask_reports_bad_input_clearly(tmp_path):
    missing = ctxtree("ask", "--doc", str(tmp_path / "nope.txt"), "--question", "x")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    res = ctxtree("ask", "--doc", str(empty), "--question", "What?")
    assert res.returncode == 2 and "document is empty" in res.stderr
    res = ctxtree("ask", "--doc", str(SAMPLE), "--question", "x", "--keep", "0")
    assert res.returncode == 2 and "keep (p) must be >= 1" in res.stderr


def test_ask_without_the_adapter_answers_in_prose(smollm_dir):
    # `--adapter none` is the base model (what README suggests for questions that are not
    # lookups): it answers in sentences, and the report shows every chunk searched
    res = ctxtree("ask", "--doc", str(SAMPLE), "--question", "Who may copy and distribute this license?",
                  "--max-tokens", "24", "--adapter", "none")
    assert res.returncode == 0, res.stderr
    assert len(answer_of(res.stdout).split()) >= 3, res.stdout
    assert "chunks not injected" not in res.stdout

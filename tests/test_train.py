"""Training data and `ctxtree train`: the generator is deterministic and its splits never
meet; a short run on a tiny random model lowers the loss, survives a kill and resumes from
its checkpoint; the adapter it writes loads in `ctxtree ask`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, save_tiny
from ctxtree.pipelines.data import (HELDOUT_VOCAB, KINDS, TRAIN_VOCAB, haystack_texts, is_correct, load_haystack,
                            make_needle_chunk, make_sample)

STEPS = 200  # long enough that the kill lands mid-run (a tiny step takes ~30 ms)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    from ctxtree.kernels.weights import load_tokenizer

    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="module")
def haystacks(tokenizer):
    return {split: load_haystack(tokenizer, split) for split in ("train", "heldout")}


def test_samples_are_deterministic_and_hold_their_facts(tokenizer, haystacks):
    for split, hay in haystacks.items():
        for kind in KINDS:
            a = make_sample(tokenizer, hay, 7, 2048, kind, seed=3)
            b = make_sample(tokenizer, hay, 7, 2048, kind, seed=3)
            assert a == b
            other = make_sample(tokenizer, hay, 8, 2048, kind, seed=3)
            assert (other.documents, other.question) != (a.documents, a.question)
            assert sum(len(d) for d in a.documents) == 2048
            assert len(a.documents) == (2 if kind == "spread" else 1)
            text = "\n".join(a.texts(tokenizer))
            for fact in a.facts:  # every fact is readable in the document text, value included
                assert fact.sentence in text
            assert all(v in text for v in a.answers)
            assert is_correct(f"It is {' and '.join(a.answers)}.", a)
            assert not is_correct("It is " + a.answers[0] + "1", a)
            if kind == "multi":
                assert len(a.facts) == 4 and len({f.value for f in a.facts}) == 4


def test_splits_never_overlap(tokenizer, haystacks):
    train_names = {n for n, _ in haystack_texts("train")}
    heldout_names = {n for n, _ in haystack_texts("heldout")}
    assert train_names and heldout_names and not train_names & heldout_names
    for field in ("colors", "places", "attributes", "facts", "questions", "pair_questions", "paraphrase"):
        assert not set(getattr(TRAIN_VOCAB, field)) & set(getattr(HELDOUT_VOCAB, field)), field
    paraphrases = [set(x for pair in v.paraphrase for x in pair) for v in (TRAIN_VOCAB, HELDOUT_VOCAB)]
    assert not paraphrases[0] & paraphrases[1]
    # held-out documents are held-out text: no 64-token window of one appears in training text
    train_tokens = haystacks["train"].tokens
    windows = {tuple(train_tokens[i:i + 64]) for i in range(0, len(train_tokens) - 64, 16)}
    s = make_sample(tokenizer, haystacks["heldout"], 0, 4096, "single")
    doc = s.documents[0]
    assert not any(tuple(doc[i:i + 64]) in windows for i in range(0, len(doc) - 64, 16))
    # training needle chunks use training entities only
    chunk = make_needle_chunk(tokenizer, haystacks["train"], 0, 0, 1024)
    for fact in chunk.facts:
        color, place = fact.entity.split()[1:]
        assert color in TRAIN_VOCAB.colors and place in TRAIN_VOCAB.places
    # a 64K-token held-out document exists (the longest point of bench/quality.py)
    assert len(make_sample(tokenizer, haystacks["heldout"], 0, 65536, "single").documents[0]) == 65536


def test_values_of_every_kind_are_stated_and_found(tokenizer, haystacks):
    from ctxtree.pipelines.data import VALUE_KINDS, value_found

    for split, hay in haystacks.items():
        seen = set()
        for i, values in enumerate(VALUE_KINDS * 2):
            for kind in ("single", "multi"):
                s = make_sample(tokenizer, hay, i, 1024, kind, seed=4, values=values)
                text = s.texts(tokenizer)[0]
                assert all(f.sentence in text for f in s.facts) and len({f.value for f in s.facts}) == len(s.facts)
                d, at = s.answer_positions[0]
                # the recorded position is the value's first token (oracle routing descends to it)
                assert tokenizer.decode(s.documents[d][at:at + 8]).strip().startswith(s.answers[0][:3])
                assert is_correct(f"I think it is {s.answers[0]}.", s)
                assert not is_correct("It is " + s.answers[0] + "1", s) and not is_correct("no idea", s)
                seen.add(values if values == "digits" or not s.answers[0].isdigit() else "?")
        assert seen == set(VALUE_KINDS)
        chunk = make_needle_chunk(tokenizer, hay, 2, 0, 256, 4, (3, 6), VALUE_KINDS)
        for f, pos in zip(chunk.facts, chunk.value_positions):
            assert tokenizer.decode(chunk.tokens[pos:pos + 8]).strip().startswith(f.value[:3])
    assert value_found("Tanaka", "The manager is Mr. tanaka.") and not value_found("Tanaka", "Tanakas")
    assert value_found("12-34-56", "code 12-34-56.") and not value_found("12-34-56", "112-34-56")
    assert not value_found("ember", "Remember it") and value_found("482", "482.") and not value_found("482", "4821")
    # held-out words, names, layouts and attributes never appear in training
    for field in ("words", "names", "codes"):
        assert not set(getattr(TRAIN_VOCAB, field)) & set(getattr(HELDOUT_VOCAB, field)), field
    for kind in TRAIN_VOCAB.kind_attributes:
        assert not set(TRAIN_VOCAB.kind_attributes[kind]) & set(HELDOUT_VOCAB.kind_attributes[kind])
    assert TRAIN_VOCAB.date_format != HELDOUT_VOCAB.date_format
    # half the training words and names are made up: too many to learn by heart, so the
    # decoder must copy them; none is a held-out one
    import random

    from ctxtree.pipelines.data import _kind_value

    rng = random.Random(0)
    drawn = [_kind_value(rng, TRAIN_VOCAB, kind, (3, 6)) for kind in ("word", "name") * 200]
    assert len(set(drawn)) > 200 and not set(drawn) & (set(HELDOUT_VOCAB.words) | set(HELDOUT_VOCAB.names))
    held = {_kind_value(rng, HELDOUT_VOCAB, "word", (3, 6)) for _ in range(200)}
    assert held <= set(HELDOUT_VOCAB.words)  # the held-out split keeps real words only
    with pytest.raises(ValueError, match="value kinds"):
        make_sample(tokenizer, haystacks["train"], 0, 1024, "single", values="emoji")
    with pytest.raises(ValueError, match="paraphrase"):
        make_sample(tokenizer, haystacks["train"], 0, 1024, "paraphrase", values="word")


def test_bad_sample_requests_are_refused(tokenizer, haystacks):
    with pytest.raises(ValueError, match="kind"):
        make_sample(tokenizer, haystacks["train"], 0, 2048, "riddle")
    with pytest.raises(ValueError, match="exceeds"):
        make_sample(tokenizer, haystacks["heldout"], 0, 10 ** 6, "single")
    with pytest.raises(ValueError, match="too short"):
        make_sample(tokenizer, haystacks["train"], 0, 32, "single")


# ---- ctxtree train on a tiny random model -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (so the real data fit)."""
    path = save_tiny(tmp_path_factory.mktemp("tiny-chat"), seed=1, vocab_size=49152, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=3, max_position_embeddings=2048,
                     initializer_range=0.1)  # logits with some range, so the loss can move
    for name in TOKENIZER_FILES:
        if (smollm_dir / name).is_file():
            shutil.copy(smollm_dir / name, path / name)
    return path


def test_fresh_needles_never_repeat_a_fact_and_bad_settings_are_refused(tiny_chat_model, tmp_path):
    """pool_size 0: example k asks fact k % F of needle chunk k // F (no fact twice, so
    nothing can be learnt by heart); short needles are one-chunk documents."""
    import random

    from ctxtree.runtime import NO_ADAPTER, load_runtime
    from ctxtree.kernels.tree import TreeConfig
    from ctxtree.pipelines.chunk_pool import ChunkCache, ChunkPool
    from ctxtree.pipelines.train import TrainConfig
    from ctxtree.pipelines.train_step import make_example

    rt = load_runtime(tiny_chat_model, TreeConfig(n_layers=2, chunk_len=128, keep=8), adapter=NO_ADAPTER)
    pool = ChunkPool(ChunkCache(tmp_path, rt.fingerprint, rt.model, rt.tree_config), rt.tokenizer,
                     load_haystack(rt.tokenizer, "train"), seed=0, digits=(2, 3), facts_per_chunk=2, needle_len=64)
    asked = []
    for k in range(6):
        ex = make_example(pool, random.Random(k), 0, 1, 0.0, 0.5, serial=k)
        assert len(ex.trees) == 1 and ex.trees[0].chunk_lengths == [64]
        tree, facts, questions, _ = pool.needle_chunk(k // 2)
        assert ex.question == questions[k % 2] and ex.target == facts[k % 2].value
        asked.append((ex.question, ex.target))
    assert len(set(asked)) == 6 and pool.built == 3
    with pytest.raises(ValueError, match="spread"):
        TrainConfig(out="x", pool_size=0, spread_fraction=0.2)
    with pytest.raises(ValueError, match="one-chunk"):
        TrainConfig(out="x", chunk_len=1024, needle_len=256, max_chunks=2, spread_fraction=0.0)
    with pytest.raises(ValueError, match="needle_len"):
        TrainConfig(out="x", needle_len=4096)


def test_training_documents_join_only_the_kept_chunks_and_train_the_same(tiny_chat_model, tmp_path):
    """Training documents are search indexes plus their chunks, whose K/V are joined only
    for the chunks search keeps: the loss is the one the whole document's tree gives
    (searched, teacher-routed, two documents), and it does depend on those K/V."""
    import random

    import torch

    from ctxtree.runtime import NO_ADAPTER, load_runtime
    from ctxtree.kernels.tree import TreeConfig, build_tree
    from ctxtree.pipelines.chunk_pool import assemble, assemble_index
    from ctxtree.pipelines.train_step import Example, answer_step
    from ctxtree.prompt import end_of_turn_id

    rt = load_runtime(tiny_chat_model, TreeConfig(n_layers=2, chunk_len=128, keep=8), adapter=NO_ADAPTER)
    decoder = rt.decoder
    decoder.top_chunks = 2
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking weights: the answer depends on what is injected
        for _, p in decoder.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rng = random.Random(0)
    docs = [[build_tree(rt.model, torch.tensor([rng.randrange(300, 20000) for _ in range(128)]), rt.tree_config)
             for _ in range(n)] for n in (7, 4)]
    end = end_of_turn_id(rt.tokenizer)

    def examples(lazy: bool, chunks: list[list]) -> list[Example]:
        trees = [assemble_index(c) if lazy else assemble(c) for c in chunks]
        parts = chunks if lazy else None
        return [Example(trees=trees[:1], question="What is the access code of the amber chapel?", target="4821",
                        parts=parts and parts[:1]),
                Example(trees=trees[:1], question="Where is it?", target="north", answer_at=[(5, 40)], oracle=True,
                        parts=parts and parts[:1]),
                Example(trees=trees, question="What are the two codes?", target="77 and 12", parts=parts)]

    lazy = examples(True, docs)
    assert lazy[0].trees[0].keys.shape[2] == 0  # the index holds no K/V
    with torch.no_grad():
        whole = answer_step(decoder, rt.tokenizer, end, examples(False, docs))
        joined = answer_step(decoder, rt.tokenizer, end, lazy)
        other = answer_step(decoder, rt.tokenizer, end, examples(True, [docs[0][::-1], docs[1][::-1]]))
    assert whole.tokens == joined.tokens
    assert torch.allclose(whole.loss, joined.loss, atol=1e-6, rtol=0), (whole.loss, joined.loss)
    assert abs(float(other.loss) - float(whole.loss)) > 1e-4  # other chunks injected, another loss


def train_cmd(model: Path, out: Path, pool: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "ctxtree.pipelines.train", "--model", str(model), "--out", str(out),
            "--pool-dir", str(pool), "--steps", str(steps), "--batch", "4", "--lr", "0.01", "--warmup", "5",
            "--layers", "2", "--chunk-len", "128", "--keep", "8", "--pool-size", "0", "--digits", "1-2",
            "--max-chunks", "2", "--ramp-steps", "10", "--eval-every", "50", "--eval-chunks", "1",
            "--checkpoint-every", "5", "--log-every", "5", "--prose-fraction", "0.3", "--prose-examples", "8", "--top-chunks", "1",
            "--value-kinds", "digits", "--facts-per-chunk", "2",
            # fresh needles (--pool-size 0): with a pool of 6 the 12 facts were learnt by heart
            # and the 2-question held-out loss rose again after step 50 (11.5 -> 10.7 -> 10.9,
            # under the 1-nat bar); fresh, it falls 11.5 -> 7.5 (measured 2026-12-04)
            "--seed", "3",
            "--threads", "1"]


def env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(REPO)}


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_resumes_after_a_kill(tiny_chat_model, tmp_path):
    out, pool = tmp_path / "run", tmp_path / "pool"
    # first run: killed (its whole process group, Ray included) once a checkpoint exists
    proc = subprocess.Popen(train_cmd(tiny_chat_model, out, pool, STEPS), env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("step-0000015")):
            assert proc.poll() is None, "training exited before its first checkpoints"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
        proc.wait(timeout=60)
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert 15 <= killed_at < STEPS
    assert not (out / "adapter").exists()

    res = subprocess.run(train_cmd(tiny_chat_model, out, pool, STEPS), env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resume from {out / 'checkpoints'}" in res.stdout + res.stderr
    rows = log_rows(out)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps[-1] == STEPS
    # resumed where the checkpoint left off, not from scratch: one starting evaluation only
    assert sum(1 for r in rows if r["step"] == 0) == 1, rows
    assert steps.count(killed_at + 5) == 1, (killed_at, steps)
    # held-out answer loss (the same questions every time) fell
    evals = {r["step"]: r["eval_search_loss"] for r in rows if "eval_search_loss" in r}
    assert evals[STEPS] < evals[0] - 1.0, evals
    adapter = out / "adapter"
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["trained_steps"] == STEPS and meta["n_layers"] == 2 and meta["base_weights_digest"]
    assert meta["top_chunks"] == 1  # served with the chunk selection it was trained with
    # prose examples (the teacher's answers and top-k) were made once, and the held-out
    # information recovered is tracked
    assert len(list(pool.rglob("prose2-train-*.json"))) == 1 and len(list(pool.rglob("prose2-train-*.safetensors"))) == 1
    prose_evals = [r for r in rows if "eval_search_loss" in r]
    assert all(r["eval_prose_kl_base"] > 0 and r["eval_prose_recovered"] <= 1 for r in prose_evals), prose_evals
    assert any("prose_kl" in r for r in rows)
    # checkpoints are safetensors + JSON only: nothing to unpickle
    assert {p.suffix for p in (out / "checkpoints").rglob("*") if p.is_file()} <= {".safetensors", ".json"}

    # the recipe is fixed per run directory
    bad = subprocess.run(train_cmd(tiny_chat_model, out, pool, STEPS)[:-2] + ["--threads", "1", "--lr", "0.5"],
                         env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "another recipe" in bad.stderr and "lr" in bad.stderr

    # the adapter loads in `ctxtree ask`; an adapter for other weights is refused
    doc = tmp_path / "doc.txt"
    doc.write_text("The access code of the amber chapel is 42.\n" * 20)
    ask = [sys.executable, "-m", "ctxtree.cli", "ask", "--model", str(tiny_chat_model), "--layers", "2",
           "--chunk-len", "128", "--keep", "8", "--doc", str(doc), "--question", "What is the access code?",
           "--max-tokens", "4"]
    ok = subprocess.run(ask + ["--adapter", str(adapter)], env=env(), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "A: " in ok.stdout and "timings:" in ok.stdout
    other = save_tiny(tmp_path / "other", seed=9, vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, max_position_embeddings=2048)
    for name in TOKENIZER_FILES:
        if (tiny_chat_model / name).is_file():
            shutil.copy(tiny_chat_model / name, other / name)
    ask[ask.index("--model") + 1] = str(other)
    refused = subprocess.run(ask + ["--adapter", str(adapter)], env=env(), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "trained for base weights" in refused.stderr


def test_the_recipe_is_valid_and_its_last_stage_is_the_default():
    from ctxtree.pipelines.recipe import STAGES
    from ctxtree.pipelines.train import TrainConfig

    from ctxtree.pipelines.recipe import SHIPPED_STAGE

    configs = [TrainConfig(out=name, **stage) for name, stage in STAGES]  # each validates itself
    assert [c.seed for c in configs] == sorted({c.seed for c in configs})  # every stage sees new facts
    last = configs[[name for name, _ in STAGES].index(SHIPPED_STAGE)]
    default = TrainConfig(out=last.out)
    settings = lambda c: {k: v for k, v in c.recipe().items() if k not in ("seed", "init_adapter")}  # noqa: E731
    assert settings(last) == settings(default) and last.steps == default.steps, \
        "`ctxtree train` defaults must be the shipped adapter's last stage"


def test_no_ray_trains_in_this_process_where_ray_is_not_installed(tiny_chat_model, tmp_path):
    """`--no-ray`: one GPU box without Ray (the lent H200 of docs/quality.md "runs G1-G2")
    trains with the same loop, checkpoints and adapter; here Ray is made unimportable."""
    out, pool = tmp_path / "run", tmp_path / "pool"
    args = train_cmd(tiny_chat_model, out, pool, 10)[3:] + ["--no-ray"]
    script = ("import sys; sys.modules['ray'] = None  # as if Ray were not installed\n"
              "from ctxtree.pipelines.train import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", script, *args], env=env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["trained_steps"] == 10
    assert [r["step"] for r in log_rows(out) if "loss" in r][-1] == 10
    assert not (out / "ray").exists()  # no Ray Train storage: nothing ran on Ray
    two = subprocess.run([sys.executable, "-c", script, *args, "--workers", "2"], env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert two.returncode == 2 and "one worker" in two.stderr


def test_upper_layer_adapters_are_trained_saved_and_served(tiny_chat_model, tmp_path):
    """`--upper-rank`: low-rank adapters above the injection layers learn with the rest and
    travel in the adapter (docs/quality.md "Depth")."""
    from safetensors.torch import load_file

    out, pool = tmp_path / "run", tmp_path / "pool"
    args = train_cmd(tiny_chat_model, out, pool, 6)[3:] + ["--no-ray", "--upper-rank", "4"]
    res = subprocess.run([sys.executable, "-m", "ctxtree.pipelines.train", *args], env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "adapter" / "adapter.json").read_text())["upper_rank"] == 4
    weights = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert weights["upper.q_up"].abs().max() > 0 and weights["upper.v_up"].abs().max() > 0  # they learnt
    bad = subprocess.run([sys.executable, "-m", "ctxtree.pipelines.train", *args[:-1], "-2"], env=env(),
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "upper_rank must be >= 0" in bad.stderr

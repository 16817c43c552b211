"""`ctxtree train`: train the injection weights on Ray Train (method.md §6).

    ctxtree train --out runs/m4                                # local Ray, one CPU worker
    ctxtree train --out /shared/runs/m4 --address auto --workers 4 --use-gpu   # a cluster
    ctxtree train --out runs/m4 --use-gpu --no-ray --batch 16 --prose-batch 64  # one GPU box, no Ray

The defaults are the last stage of the shipped adapter's recipe (the whole recipe, one command:
`python -m ctxtree.pipelines.recipe`; docs/training.md); --out must be a
path every worker can write (a shared filesystem on a cluster; rank 0 writes).

A TorchTrainer runs `train_loop` on each worker (CPU here, GPU on a cluster); gradients
of the adapter are averaged across workers. Data come from ctxtree/pipelines/data.py through a
ChunkPool (compressed chunks cached on disk, so a step costs only the decoder pass).

Resumable: every --checkpoint-every steps the adapter, the AdamW state and the step
are written to <out>/checkpoints/step-N/ (safetensors + JSON, atomically renamed into
place) and reported to Ray Train. Running the same command again, after a kill or to
train further with a larger --steps, continues from the newest checkpoint; the example
stream is a function of (seed, step), so a resumed run sees the data it would have seen.
The result is <out>/adapter/ (adapter.safetensors + adapter.json with the base model's
digest), loaded with `--adapter DIR` by `ctxtree ask` and `ctxtree serve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ctxtree.cli_args import reading_layer
from ctxtree.pipelines.data import PROSE_KINDS, VALUE_KINDS, check_value_kinds

PROSE_PASSAGES = ("haystack", "wide")

ADAPTER_DIR = "adapter"
CHECKPOINTS = "checkpoints"
LOG = "log.jsonl"
EVAL_PROSE = 16   # held-out prose examples of the periodic evaluation


@dataclass(frozen=True)
class TrainConfig:
    out: str
    model: str | None = None
    init_adapter: str | None = None       # start from these weights (a fresh run only)
    steps: int = 200                      # length of the learning-rate schedule
    stop_at: int = 0                      # end the run at this step (0 = steps): a schedule cut short
    batch: int = 4
    lr: float = 5e-4
    min_lr_fraction: float = 0.1          # cosine decay to lr * this
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    layers: int = 4
    chunk_len: int = 256
    height: int = 3
    keep: int = 32
    pool_dir: str | None = None           # default <cache>/train-pool
    pool_size: int = 0                    # needle chunks, drawn at random; 0 = a fresh chunk every few examples
    needle_len: int = 0                   # needle chunk length in tokens; 0 = chunk_len (shorter: one-chunk documents)
    facts_per_chunk: int = 4
    haystack_chunks: int = 512            # haystack chunks documents are drawn from; 0 = the whole split
    digits: tuple[int, int] = (3, 6)
    value_kinds: tuple[str, ...] = ("digits", "code", "word", "name", "date")  # asked values (data.VALUE_KINDS)
    max_chunks: int = 8                   # context chunks per document at the end of the curriculum
    ramp_steps: int = 0                   # steps from 1 chunk per document to max_chunks
    spread_fraction: float = 0.0          # two-document questions (needles from a pool: pool_size >= 2)
    oracle_fraction: float = 0.1          # examples routed to the answer's nodes (teacher routing)
    top_chunks: int = 2                   # chunks search injects per question (0 = all); saved with the adapter
    copy_head: bool = False               # train a copy head (a pointer over the injected tokens; kernels/inject.py)
    upper_rank: int = 0                   # low-rank adapters on q/v of layers M..N-1 (kernels/inject.py); 0 = none
    reading_from: int | None = 0          # reading layers J..N-1 (kernels/reading.py); None = none; needs top_chunks
    train_cross_attn: bool = True         # False: only the copy head learns (the cross-attention keeps its weights)
    prose_fraction: float = 0.5           # examples that are prose questions answered by the base model
    prose_examples: int = 2048            # distinct prose examples (teacher answers made once, cached)
    prose_needles: float = 0.4            # share of their passages that are needle chunks (facts, values)
    prose_kinds: tuple[str, ...] = ("template", "written")  # which of them are used (prose.KIND_CYCLE's kinds)
    prose_seed: int = 3                   # the prose set's seed: the teacher's answers cost 1.8 s each, stages share them
    prose_batch: int = 8                  # prompts the teacher answers at once (a speed setting: 64+ on a GPU)
    # passages of prose questions: "haystack", the lookup haystack's chunks (pydoc topics and
    # licences: ~600 chunks, memorised by 1,500 examples, docs/quality.md G1-G2); "wide", every
    # chunk of data.wide_prose_texts (that haystack plus addresses, Genesis, plays: 3,744 of 256 tokens)
    prose_passages: str = "haystack"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    eval_every: int = 100
    eval_chunks: int = 4                  # held-out needle chunks (4 questions each)
    seed: int = 0
    workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    threads: int = 0                      # torch threads per worker; 0 = ceil(cpus_per_worker)
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.workers < 1:
            raise ValueError("steps, batch and workers must be >= 1")
        if not 0 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be within 0..steps ({self.steps}), got {self.stop_at}")
        if not self.lr > 0 or self.pool_size == 1 or self.pool_size < 0 or self.max_chunks < 1:
            raise ValueError("lr must be > 0, pool_size 0 (fresh) or >= 2, max_chunks >= 1")
        if self.pool_size == 0 and self.spread_fraction > 0:
            raise ValueError("spread examples draw needles from a pool: set spread_fraction 0 with pool_size 0")
        if not 0 <= self.needle_len <= self.chunk_len or self.facts_per_chunk < 1:
            raise ValueError(f"needle_len must be within 0..chunk_len ({self.chunk_len}), facts_per_chunk >= 1")
        if 0 < self.needle_len < self.chunk_len and (self.max_chunks > 1 or self.spread_fraction > 0):
            raise ValueError("needles shorter than chunk_len are one-chunk documents: set max_chunks 1, "
                             "spread_fraction 0")
        if self.top_chunks < 0:
            raise ValueError(f"top_chunks must be >= 0 (0: every chunk), got {self.top_chunks}")
        if not 0 <= self.prose_fraction < 1 or self.prose_examples < 1 or not 0 <= self.prose_needles <= 1:
            raise ValueError("prose_fraction must be within [0, 1), prose_needles within [0, 1], prose_examples >= 1")
        if not self.train_cross_attn and not self.copy_head and not self.upper_rank:
            raise ValueError("nothing to train: --no-train-cross-attn needs --copy-head or --upper-rank")
        if self.reading_from is not None and not isinstance(self.reading_from, int):
            raise ValueError(f"--reading-from: a layer number or 'none', got {self.reading_from!r}")
        if self.reading_from is not None and self.top_chunks < 1:
            raise ValueError("--reading-from reads the injected chunks at full depth: it needs --top-chunks >= 1")
        if self.upper_rank < 0:
            raise ValueError(f"upper_rank must be >= 0 (0: no upper-layer adapters), got {self.upper_rank}")
        if self.haystack_chunks < 0:
            raise ValueError(f"haystack_chunks must be >= 0 (0: all), got {self.haystack_chunks}")
        check_value_kinds(tuple(self.value_kinds))
        if self.prose_passages not in PROSE_PASSAGES:
            raise ValueError(f"prose_passages must be one of {', '.join(PROSE_PASSAGES)}; got {self.prose_passages!r}")
        if not self.prose_kinds or not set(self.prose_kinds) <= set(PROSE_KINDS):
            raise ValueError(f"prose_kinds must be some of {', '.join(PROSE_KINDS)}; got {self.prose_kinds}")
        if not 1 <= self.digits[0] <= self.digits[1] <= 12:
            raise ValueError(f"digits must be a range within 1..12, got {self.digits}")

    @property
    def last_step(self) -> int:
        """The step the run ends at: stop_at, else the end of the schedule."""
        return self.stop_at or self.steps

    def tree_config(self):
        from ctxtree.kernels.tree import TreeConfig

        return TreeConfig(n_layers=self.layers, chunk_len=self.chunk_len, height=self.height, keep=self.keep)

    def recipe(self) -> dict:
        """What determines the trained weights (not where they go or how fast)."""
        d = dataclasses.asdict(self)
        for k in ("out", "pool_dir", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_chunks",
                  "log_every", "threads", "cpus_per_worker", "use_gpu", "steps", "stop_at", "prose_batch"):
            d.pop(k)
        return d


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _step_rng(cfg: TrainConfig, step: int, rank: int, row: int) -> random.Random:
    key = f"train:{cfg.seed}:{step}:{rank}:{row}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def latest_checkpoint(out: Path) -> Path | None:
    root = out / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _write_checkpoint(out: Path, step: int, decoder, opt, names: list[str], base_digest: str, cfg: TrainConfig,
                      metrics: dict) -> Path:
    from ctxtree.kernels.inject import save_adapter
    from ctxtree.pipelines.train_step import save_optimizer

    root = out / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(decoder, tmp, base_digest, {"trained_steps": step, "recipe": cfg.recipe()})
    save_optimizer(opt, names, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint is visible only when complete
    old = sorted(p for p in root.glob("step-*"))[:-cfg.keep_checkpoints]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def train_loop(config: dict) -> None:
    """Ray Train worker entry point (also runs without Ray for tests and debugging)."""
    import torch
    import torch.distributed as dist

    from ctxtree.runtime import NO_ADAPTER, cache_dir, load_runtime
    from ctxtree.kernels.inject import InjectionDecoder, extend_injection, load_adapter
    from ctxtree.pipelines.chunk_pool import ChunkCache, ChunkPool
    from ctxtree.pipelines.data import load_haystack, wide_prose_texts
    from ctxtree.pipelines.prose import prose_set, prose_tree
    from ctxtree.prompt import end_of_turn_id
    from ctxtree.pipelines.teacher import teacher_model
    from ctxtree.pipelines.train_step import (Example, answer_step, curriculum_chunks, information_recovered,
                                              load_optimizer, make_example)

    cfg = TrainConfig(**{**config, "digits": tuple(config["digits"]), "value_kinds": tuple(config["value_kinds"]),
                         "prose_kinds": tuple(config["prose_kinds"])})
    rank, world = 0, 1
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        in_ray = True
    except Exception:  # not under Ray Train
        in_ray = False
    torch.set_num_threads(cfg.threads or max(1, math.ceil(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    rt = load_runtime(Path(cfg.model) if cfg.model else None, cfg.tree_config(), adapter=NO_ADAPTER)
    if cfg.use_gpu and torch.cuda.is_available():
        rt.model.to(f"cuda:{torch.cuda.current_device()}")
    decoder = rt.decoder
    resume = latest_checkpoint(out)
    if resume is not None:
        decoder = load_adapter(rt.model, resume, rt.weights_digest)
    elif cfg.init_adapter:
        decoder = load_adapter(rt.model, Path(cfg.init_adapter), rt.weights_digest)
        decoder = extend_injection(decoder, cfg.layers)  # a shallower start: new layers begin at o_proj 0
    decoder.top_chunks = cfg.top_chunks  # search as the adapter will be served
    decoder.set_reading(cfg.reading_from)  # and read as it will be served
    if cfg.copy_head:
        decoder.add_copy_head()  # a fresh one where the starting weights have none
    if cfg.upper_rank:
        decoder.add_upper(cfg.upper_rank)  # fresh (zero) ones where the starting weights have none
    decoder.train()
    for p in rt.model.parameters():
        p.requires_grad_(False)
    named = [(n, p) for n, p in decoder.adapter_parameters() if cfg.train_cross_attn or not n.startswith("cross_attn.")]
    names, params = [n for n, _ in named], [p for _, p in named]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume is not None:
        load_optimizer(opt, names, resume / "optimizer.safetensors")
        start = json.loads((resume / "state.json").read_text())["step"]
    end_id = end_of_turn_id(rt.tokenizer)
    pool_dir = Path(cfg.pool_dir) if cfg.pool_dir else cache_dir() / "train-pool"
    chunks = ChunkCache(pool_dir, rt.fingerprint, rt.model, rt.tree_config)

    def needle_pool(haystack, seed: int, haystack_chunks: int = cfg.haystack_chunks) -> ChunkPool:
        return ChunkPool(chunks, rt.tokenizer, haystack, seed, cfg.digits, cfg.facts_per_chunk, cfg.needle_len,
                         haystack_chunks, cfg.value_kinds)

    train_pool, eval_pool = (needle_pool(load_haystack(rt.tokenizer, split), cfg.seed)
                             for split in ("train", "heldout"))
    prose, eval_prose = [], []
    prose_pool = eval_prose_pool = base_only = None
    if cfg.prose_fraction > 0:
        base_only = InjectionDecoder(rt.model, cfg.layers).eval()  # no trained weights: the base model
        teacher = teacher_model(rt.model)

        def say(msg: str) -> None:
            if rank == 0:
                print(f"[train] prose: {msg}", flush=True)

        t0 = time.perf_counter()
        # passages that are needle chunks come from pools of the prose seed (their text is what
        # the teacher read)
        prose_pool, eval_prose_pool = (pool if cfg.prose_seed == cfg.seed else
                                       needle_pool(pool.haystack, cfg.prose_seed) for pool in (train_pool, eval_pool))
        if cfg.prose_passages == "wide":  # every chunk of the wide texts, not the lookups' first chunks
            prose_pool = needle_pool(load_haystack(rt.tokenizer, "train", wide_prose_texts(), label="train-wide"),
                                     cfg.prose_seed, haystack_chunks=0)
        prose = prose_set(prose_pool, teacher, rt.tokenizer, rt.stop_ids, end_id, cfg.prose_examples,
                          cfg.prose_needles, cfg.prose_seed, chunks.dir, log=say, batch=cfg.prose_batch)
        eval_prose = prose_set(eval_prose_pool, teacher, rt.tokenizer, rt.stop_ids, end_id, EVAL_PROSE,
                               cfg.prose_needles, cfg.prose_seed, chunks.dir, log=say, batch=cfg.prose_batch)
        # the held-out evaluation keeps every kind: it measures, it does not train
        prose = [p for p in prose if p.kind in cfg.prose_kinds]
        say(f"{len(prose)} training ({', '.join(cfg.prose_kinds)}) and {len(eval_prose)} held-out examples "
            f"({time.perf_counter() - t0:.0f} s)")
        del teacher
    n_params = sum(p.numel() for p in params)
    if rank == 0:
        print(f"[train] {n_params:,} trainable parameters; steps {start}->{cfg.last_step} (schedule {cfg.steps}); batch {cfg.batch} x {world} "
              f"workers; resume from {resume or 'scratch'}", flush=True)

    def evaluate() -> dict:
        """Held-out questions over one-chunk documents, searched and (as a bound) oracle-routed."""
        decoder.eval()
        out = {}
        for mode in ("search", "oracle"):
            examples = []
            for k in range(cfg.eval_chunks):
                tree, facts, questions, positions = eval_pool.needle_chunk(k)
                examples += [Example(trees=[tree], question=q, target=f.value, answer_at=[(0, p)],
                                     oracle=mode == "oracle") for f, q, p in zip(facts, questions, positions)]
            tot = {"loss": 0.0, "tokens": 0, "correct": 0, "exact": 0}
            with torch.no_grad():
                for i in range(0, len(examples), cfg.batch):
                    batch = examples[i:i + cfg.batch]
                    r = answer_step(decoder, rt.tokenizer, end_id, batch)
                    tot["loss"] += float(r.loss) * len(batch)  # r.loss is a mean over examples
                    tot["tokens"] += r.tokens
                    tot["correct"] += r.correct_tokens
                    tot["exact"] += r.exact
            out.update({f"eval_{mode}_loss": tot["loss"] / len(examples),
                        f"eval_{mode}_token_acc": tot["correct"] / tot["tokens"],
                        f"eval_{mode}_exact": tot["exact"] / len(examples)})
        if eval_prose:  # held-out prose: how much of the passage reaches the decoder
            examples = [Example(trees=[prose_tree(eval_prose_pool, p)], question=p.question, target=p.answer,
                                teacher=p.teacher) for p in eval_prose]
            r = information_recovered(decoder, base_only, rt.tokenizer, end_id, examples, cfg.batch)
            out.update({"eval_prose_kl": r["kl_student"], "eval_prose_kl_base": r["kl_base"],
                        "eval_prose_recovered": r["recovered"]})
        decoder.train()
        return out

    log = (out / LOG).open("a") if rank == 0 else None
    if start == 0:  # the starting point, for the record: where the loss curve is judged from
        initial = {"step": 0, **evaluate()}
        if rank == 0:
            log.write(json.dumps({"time": time.time(), **initial}) + "\n")
            log.flush()
            print("[train] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in initial.items()), flush=True)

    def new_window() -> dict:
        """Sums over the steps since the last log line."""
        return {"loss": 0.0, "tokens": 0, "correct": 0, "exact": 0, "rows": 0, "kl": 0.0, "kl_rows": 0,
                "t": time.perf_counter()}

    window = new_window()
    metrics: dict = {}
    last = cfg.last_step
    for step in range(start, last):
        lr = learning_rate(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        max_chunks = curriculum_chunks(step, cfg.max_chunks, cfg.ramp_steps)
        examples = [make_example(train_pool, _step_rng(cfg, step, rank, row), cfg.pool_size, max_chunks,
                                 cfg.spread_fraction, cfg.oracle_fraction, ((step * world) + rank) * cfg.batch + row,
                                 prose, cfg.prose_fraction, prose_pool)
                    for row in range(cfg.batch)]
        r = answer_step(decoder, rt.tokenizer, end_id, examples)
        opt.zero_grad(set_to_none=True)
        r.loss.backward()
        if world > 1 and dist.is_initialized():
            for p in params:  # average the adapter's gradients; the frozen base needs none
                dist.all_reduce(p.grad)
                p.grad /= world
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        window["loss"] += float(r.loss.detach()) * len(examples)
        window["tokens"] += r.tokens
        window["correct"] += r.correct_tokens
        window["exact"] += r.exact
        window["rows"] += len(examples)
        window["kl"] += sum(r.kl)
        window["kl_rows"] += len(r.kl)
        done = step + 1
        metrics = {}
        if done % cfg.log_every == 0 or done == last:
            dt = time.perf_counter() - window["t"]
            metrics = {"step": done, "loss": window["loss"] / window["rows"],
                       "token_acc": window["correct"] / window["tokens"], "exact": window["exact"] / window["rows"],
                       "lr": lr, "max_chunks": max_chunks, "s_per_step": dt / max(1, window["rows"] / cfg.batch),
                       "chunks_built": train_pool.built}
            if window["kl_rows"]:
                metrics["prose_kl"] = window["kl"] / window["kl_rows"]
            window = new_window()
        if done % cfg.eval_every == 0 or done == last:
            metrics.update({"step": done, **evaluate()})
        checkpoint_dir = None
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == last):
            checkpoint_dir = _write_checkpoint(out, done, decoder, opt, names, rt.weights_digest, cfg, metrics)
        if rank == 0 and metrics:
            log.write(json.dumps({"time": time.time(), **metrics}) + "\n")
            log.flush()
            print("[train] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in metrics.items()), flush=True)
        if in_ray and (metrics or checkpoint_dir is not None):
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            ray.train.report(metrics or {"step": done}, checkpoint=ckpt)
    if rank == 0:
        final = latest_checkpoint(out)
        adapter_out = out / ADAPTER_DIR
        tmp = out / ".tmp-adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ("adapter.safetensors", "adapter.json"):
            shutil.copy2(final / name, tmp / name)
        shutil.rmtree(adapter_out, ignore_errors=True)
        os.replace(tmp, adapter_out)
        print(f"[train] adapter written to {adapter_out}", flush=True)
        log.close()


def run(cfg: TrainConfig, address: str | None = None, in_process: bool = False) -> Path:
    """Run training on Ray Train, or (in_process) in this process without Ray: one worker,
    for a single machine such as one GPU box with no Ray installed. Returns the adapter
    directory."""
    out = Path(cfg.out).resolve()
    cfg = dataclasses.replace(cfg, out=str(out))
    if in_process and cfg.workers != 1:
        raise ValueError(f"--no-ray trains in this process: one worker, not --workers {cfg.workers}")
    out.mkdir(parents=True, exist_ok=True)
    # The recipe is fixed for the life of a run directory: resuming with another one
    # would silently train a different model.
    recipe_path = out / "recipe.json"
    if recipe_path.is_file():
        old = json.loads(recipe_path.read_text())
        new = json.loads(json.dumps(cfg.recipe()))  # as JSON has it: tuples become lists
        # settings added after the run was made compare equal when they are at their defaults
        defaults = json.loads(json.dumps(TrainConfig(out="").recipe()))
        old.update({k: v for k, v in new.items() if k not in old and v == defaults[k]})
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{out} holds a run with another recipe (differs in: {', '.join(changed)}); "
                             "use a new --out")
    else:
        recipe_path.write_text(json.dumps(cfg.recipe(), indent=1, sort_keys=True))
    # Workers run in Ray's own working directory: relative paths are the caller's.
    local = {name: str(Path(getattr(cfg, name)).resolve()) for name in ("model", "init_adapter", "pool_dir")
             if getattr(cfg, name)}
    if cfg.init_adapter and not (Path(local["init_adapter"]) / "adapter.json").is_file():
        raise ValueError(f"--init-adapter {cfg.init_adapter}: not an adapter directory (no adapter.json)")
    config = dataclasses.asdict(dataclasses.replace(cfg, **local))
    if in_process:
        train_loop(config)
        return out / ADAPTER_DIR
    import ray.train
    from ray.train.torch import TorchTrainer

    from ctxtree.pipelines.ray_compat import init_ray

    init_ray(address, dashboard=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="train", storage_path=str(out / "ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    trainer.fit()
    return out / ADAPTER_DIR


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig(out="")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, adapter/)")
    p.add_argument("--model", default=None, help="HF checkpoint directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--init-adapter", default=None, help="start a new run from these injection weights")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("out", "model", "init_adapter", "digits", "value_kinds", "prose_kinds", "use_gpu",
                      "reading_from"):
            continue
        if isinstance(getattr(defaults, f.name), bool):  # --copy-head / --no-copy-head
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                           default=getattr(defaults, f.name))
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)) if getattr(
            defaults, f.name) is not None else str, default=getattr(defaults, f.name))
    p.add_argument("--digits", default=f"{defaults.digits[0]}-{defaults.digits[1]}",
                   help="answer value length range, e.g. 2-6")
    p.add_argument("--value-kinds", default=",".join(defaults.value_kinds),
                   help=f"kinds of asked values, comma-separated, of: {', '.join(VALUE_KINDS)}")
    p.add_argument("--prose-kinds", default=",".join(defaults.prose_kinds),
                   help=f"kinds of prose questions trained on, comma-separated, of: {', '.join(PROSE_KINDS)}")
    p.add_argument("--reading-from", type=reading_layer, default=defaults.reading_from, metavar="J|none",
                   help="train with reading layers J..N-1 (the injected chunks' text, encoded by the whole model, "
                        f"joins their self-attention; kernels/reading.py); 'none': without (default {defaults.reading_from})")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process without Ray (one worker: a single machine, e.g. a GPU box with no Ray)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m ctxtree.pipelines.train") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        lo, _, hi = args.digits.partition("-")
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                  if f.name not in ("digits", "value_kinds", "prose_kinds")}
        split = lambda text: tuple(k.strip() for k in text.split(",") if k.strip())  # noqa: E731
        cfg = TrainConfig(**values, digits=(int(lo), int(hi or lo)), value_kinds=split(args.value_kinds),
                          prose_kinds=split(args.prose_kinds))
        adapter = run(cfg, args.address, in_process=args.no_ray)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"adapter: {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

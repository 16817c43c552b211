"""The compress job end to end on a real local Ray cluster (`ray start --head` on
loopback), with the real default model: local and S3 stores, failures, resume after a
driver or an actor is killed, and `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctxtree.store import TreeStore, document_key
from ctxtree.serve.launch import free_port
from tests.conftest import REPO

TREE_ARGS = ["--layers", "2", "--chunk-len", "256", "--keep", "8", "--progress-seconds", "2"]
BIN = Path(sys.executable).parent


def ray_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm_dir):
    """A local head node on loopback; stopped by its process id when the module ends."""
    port, dash = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}",
         "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}"], env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", dash), timeout=1):
                break
        except OSError:
            time.sleep(1)
    else:
        head.kill()
        pytest.fail("ray head did not start: see " + log.name)
    yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    head.send_signal(signal.SIGTERM)  # --block: tears down the node's own processes
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)  # our own session: the processes this fixture started
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Text files of real prose (slices of the GPL), a jsonl, a parquet, and bad documents."""
    root = tmp_path_factory.mktemp("corpus")
    text = (REPO / "samples" / "GPL-3.txt").read_text()
    good = {}
    for i in range(6):
        piece = text[i * 5000:(i * 5000) + 3000 + 1500 * (i % 3)]
        (root / f"doc{i}.txt").write_text(piece)
        good[str(root / f"doc{i}.txt")] = piece
    (root / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01binary")
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (root / "empty.txt").write_text("")
    rows = [{"id": "j-1", "text": text[31000:33000]}, {"id": "j-2", "text": "   "}, {"id": "j-3", "body": "x"}]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good["j-1"] = rows[0]["text"]
    pq.write_table(pa.table({"id": ["p-1"], "text": [text[20000:22000]]}), root / "docs.parquet")
    good["p-1"] = text[20000:22000]
    bad = {str(root / "binary.txt"): "binary", str(root / "latin1.txt"): "undecodable",
           str(root / "empty.txt"): "empty", "j-2": "empty", "j-3": "no 'text' string field"}
    return {"root": root, "good": good, "bad": bad}


def compress(cluster, store: str, inputs: list[str], *extra: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "ctxtree.pipelines.compress", "--address", cluster["address"], "--store", store,
           *TREE_ARGS, *extra, *inputs]
    proc = subprocess.Popen(cmd, env={**ray_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def summary_of(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("\n{") + 1:])


def fingerprint_of(store: TreeStore) -> str:
    return next(iter({name.split("/")[0] for name in store.objects.list("") if not name.startswith("ids/")}))


def assert_all_committed_once(store: TreeStore, docs: dict[str, str]):
    fp = fingerprint_of(store)
    assert sorted(store.document_ids()) == sorted(docs)
    manifests = [n for n in store.objects.list(f"{fp}/manifests")]
    assert len(manifests) == len({document_key(t, fp) for t in docs.values()})
    for doc_id, text in docs.items():
        m = store.manifest(doc_id, fp)
        assert m.key == document_key(text, fp)
        tree = store.load_tree(m)  # every shard's checksum verified
        assert tree.n_tokens == m.n_tokens and tree.n_chunks == m.n_chunks


def test_compress_local_with_failures_then_rerun_is_noop(cluster, corpus, tmp_path):
    store_dir = tmp_path / "store"
    res = compress(cluster, str(store_dir), [str(corpus["root"])], "--max-failed-fraction", "0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = summary_of(res.stdout)
    n_good, n_bad = len(corpus["good"]), len(corpus["bad"])
    assert (summary["documents"], summary["committed"], summary["failed"]) == (n_good + n_bad, n_good, n_bad)
    assert summary["bytes_per_token"] > 0 and summary["tokens_per_s"] > 0
    assert "[compress]" in res.stdout and "documents" in res.stdout  # the progress lines
    store = TreeStore(str(store_dir))
    assert_all_committed_once(store, corpus["good"])
    fp = fingerprint_of(store)
    run = summary["run_id"]
    failures = [json.loads(line) for line in store.objects.get(f"{fp}/runs/{run}/failures.jsonl").splitlines()]
    assert {f["id"]: f["error"] for f in failures}.keys() == corpus["bad"].keys()
    for f in failures:
        assert corpus["bad"][f["id"]] in f["error"]
    assert json.loads(store.objects.get(f"{fp}/runs/{run}/summary.json")) == summary

    # the committed trees are exactly what the model computes in-process
    from ctxtree.runtime import load_runtime
    from ctxtree.kernels.tree import TreeConfig, build_tree
    rt = load_runtime(tree_config=TreeConfig(n_layers=2, chunk_len=256, keep=8))
    assert rt.fingerprint == fp
    doc_id = str(corpus["root"] / "doc1.txt")
    stored = store.load_tree(store.manifest(doc_id, fp))
    ids = rt.tokenizer(corpus["good"][doc_id], add_special_tokens=False)["input_ids"]
    fresh = build_tree(rt.model, torch.tensor(ids), rt.tree_config)
    assert torch.equal(stored.node_offsets, fresh.node_offsets)
    torch.testing.assert_close(stored.keys, fresh.keys)

    objects = sorted(store.objects.list(fp + "/trees")) + sorted(store.objects.list("ids"))
    again = compress(cluster, str(store_dir), [str(corpus["root"])], "--max-failed-fraction", "0.5")
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = summary_of(again.stdout)
    assert (s2["committed"], s2["skipped"], s2["tokens"]) == (0, n_good, 0)
    assert sorted(store.objects.list(fp + "/trees")) + sorted(store.objects.list("ids")) == objects


def test_job_fails_past_the_failed_fraction(cluster, corpus, tmp_path):
    res = compress(cluster, str(tmp_path / "s"), [str(corpus["root"])], "--max-failed-fraction", "0.1")
    assert res.returncode == 1 and "documents failed" in res.stderr
    assert_all_committed_once(TreeStore(str(tmp_path / "s")), corpus["good"])  # the good ones still land


def test_compress_to_s3_on_moto(cluster, corpus, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="corpus")
        s3.create_bucket(Bucket="trees")
        docs = {}
        for i in range(3):
            path = corpus["root"] / f"doc{i}.txt"
            s3.put_object(Bucket="corpus", Key=f"in/doc{i}.txt", Body=path.read_bytes())
            docs[f"s3://corpus/in/doc{i}.txt"] = path.read_text()
        res = compress(cluster, "s3://trees/prod", ["s3://corpus/in"], env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert summary_of(res.stdout)["committed"] == 3
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            store = TreeStore("s3://trees/prod")
            assert_all_committed_once(store, docs)
            local = compress(cluster, str(tmp_path / "local"), [str(corpus["root"] / f"doc{i}.txt") for i in range(3)])
            assert local.returncode == 0
            fp = fingerprint_of(store)
            ref = TreeStore(str(tmp_path / "local"))
            for i in range(3):  # the same bytes whichever store holds them
                a = store.load_tree(store.manifest(f"s3://corpus/in/doc{i}.txt", fp))
                b = ref.load_tree(ref.manifest(str(corpus["root"] / f"doc{i}.txt"), fp))
                assert torch.equal(a.keys.view(torch.uint8), b.keys.view(torch.uint8))
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    finally:
        server.stop()


def wait_for_manifests(store_dir: Path, at_least: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"job ended before it could be killed: {proc.stderr.read()[-2000:]}")
        if store_dir.exists() and sum(1 for _ in store_dir.glob("*/manifests/*/*.json")) >= at_least:
            return
        time.sleep(0.2)
    pytest.fail("no document was committed in time")


def test_driver_killed_then_rerun_commits_everything_once(cluster, corpus, tmp_path):
    store_dir = tmp_path / "store"
    good = [p for p in corpus["good"] if p.endswith(".txt")]
    proc = compress(cluster, str(store_dir), good, wait=False)
    wait_for_manifests(store_dir, 1, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    partial = sum(1 for _ in store_dir.glob("*/manifests/*/*.json"))
    assert 1 <= partial < len(good)
    res = compress(cluster, str(store_dir), good)
    assert res.returncode == 0, res.stderr[-3000:]
    s = summary_of(res.stdout)
    assert s["skipped"] >= 1 and s["skipped"] + s["committed"] == len(good) and s["failed"] == 0
    assert_all_committed_once(TreeStore(str(store_dir)), {p: corpus["good"][p] for p in good})


def test_actor_killed_mid_job_is_restarted_and_nothing_is_lost(cluster, corpus, tmp_path):
    from ray.util.state import list_actors

    store_dir = tmp_path / "store"
    good = [p for p in corpus["good"] if p.endswith(".txt")]
    proc = compress(cluster, str(store_dir), good, wait=False)
    wait_for_manifests(store_dir, 1, proc)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    actors = [a for a in list_actors(address=cluster["address"], filters=[("state", "=", "ALIVE")])
              if "CompressActor" in (a.class_name or "") or "MapWorker" in (a.class_name or "")]
    assert actors, "no compressor actor found"
    for a in actors:
        os.kill(a.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    s = summary_of(out)
    # a document the killed actor had committed before dying is retried and found committed
    assert s["committed"] + s["skipped"] == len(good) and s["committed"] >= 1 and s["failed"] == 0
    assert_all_committed_once(TreeStore(str(store_dir)), {p: corpus["good"][p] for p in good})


def test_ray_job_submit_to_local_head(cluster, corpus, tmp_path):
    store_dir = tmp_path / "store"
    inputs = [str(corpus["root"] / "doc0.txt"), str(corpus["root"] / "doc1.txt")]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
           "--", "python", "-m", "ctxtree.pipelines.compress", "--store", str(store_dir), *TREE_ARGS, *inputs]
    for attempt in range(5):
        res = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
        # The head's job agent registers a while after the cluster is up (late on a busy
        # 2-core machine); Ray answers 500 "No available agent ... try again later" until then.
        if res.returncode == 0 or "No available agent" not in res.stderr:
            break
        time.sleep(10)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "succeeded" in res.stdout.lower()
    assert_all_committed_once(TreeStore(str(store_dir)), {p: corpus["good"][p] for p in inputs})

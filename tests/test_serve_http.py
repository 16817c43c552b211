"""`ctxtree serve` for real: Ray Serve on loopback serving a tree store written by the
pipeline's unit of work; the official openai client over HTTP; a clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ctxtree.store import TreeStore
from pipelines.document import CompressSettings, compress_document
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm_runtime, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("serve-store"))
    compress_document(smollm_runtime, TreeStore(store), "gpl", (REPO / "samples" / "GPL-3.txt").read_text()[:5000],
                      CompressSettings())
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ctxtree.cli", "serve", "--store", store, "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    import httpx2

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ctxtree serve exited early: see {log.name}")
        try:
            if httpx2.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx2.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"ctxtree serve did not become healthy: see {log.name}")
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def test_http_endpoints_and_openai_client(server):
    import httpx2
    import openai

    url, _ = server
    r = httpx2.post(url + "/v1/query", json={"documents": ["gpl"], "question": "What is this?", "max_tokens": 8},
                    timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx2.post(url + "/v1/query", json={"documents": ["none"], "question": "x"}, timeout=60).status_code == 404
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    out = oa.chat.completions.create(model="ctxtree", messages=[{"role": "user", "content": "Who wrote it?"}],
                                     max_tokens=8, extra_body={"documents": ["gpl"]})
    assert out.choices[0].message.content
    stream = oa.chat.completions.create(model="ctxtree", messages=[{"role": "user", "content": "Who wrote it?"}],
                                        max_tokens=8, extra_body={"documents": ["gpl"]}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream).strip() == out.choices[0].message.content
    metrics = httpx2.get(url + "/metrics", timeout=10).text
    # two loads started: "gpl" (once, then hits) and "none" (failed: not found)
    assert "ctxtree_tree_cache_misses_total 2.0" in metrics and "ctxtree_tree_cache_load_errors_total 1.0" in metrics
    assert "ctxtree_tree_cache_hits_total 2.0" in metrics


def test_bounded_load_has_no_server_errors(server):
    """60 requests at concurrency 4 on loopback: every one answered, none with a 5xx."""
    import concurrent.futures

    import httpx2

    url, _ = server
    body = {"documents": ["gpl"], "question": "What is this license about?", "max_tokens": 4}
    deadline = time.time() + 300

    def one(_):
        if time.time() > deadline:
            return None
        return httpx2.post(url + "/v1/query", json=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = [s for s in pool.map(one, range(60)) if s is not None]
    assert len(statuses) >= 20 and all(s < 500 for s in statuses), statuses
    assert statuses.count(200) >= len(statuses) - statuses.count(503)


def test_overload_is_503_from_the_bounded_queue(smollm_runtime, tmp_path):
    """One request in flight, one queued: a burst beyond that is refused at once with 503,
    not held in an unbounded wait, and the server keeps serving."""
    import concurrent.futures

    import httpx2

    store = str(tmp_path / "store")
    compress_document(smollm_runtime, TreeStore(store), "gpl", (REPO / "samples" / "GPL-3.txt").read_text()[:3000],
                      CompressSettings())
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ctxtree.cli", "serve", "--store", store, "--port", str(port),
                             "--max-ongoing", "1", "--max-queued", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx2.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(1)
        body = {"documents": ["gpl"], "question": "Summarize it.", "max_tokens": 48}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx2.post(url + "/v1/query", json=body, timeout=120).status_code,
                                     range(8)))
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
        assert set(statuses) <= {200, 503}
        ok = httpx2.post(url + "/v1/query", json={**body, "max_tokens": 2}, timeout=120)
        assert ok.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_shutdown_is_clean(server):
    url, proc = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0

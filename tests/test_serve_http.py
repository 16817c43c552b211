"""`ctxtree serve` for real: Ray Serve on loopback serving a tree store written by the
pipeline's unit of work, with two decoder replicas behind the ingress; the official
openai client over HTTP; requests routed to the replica holding their document; a
clean shutdown."""

from __future__ import annotations

import signal
import time

import pytest

from ctxtree.store import TreeStore
from ctxtree.pipelines.document import CompressSettings, compress_document
from ctxtree.serve.launch import ServeProcess
from tests.conftest import REPO


def metric(text: str, name: str) -> dict[str, float]:
    """{replica: value} of one per-replica metric in a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            out[line.split('replica="')[1].split('"')[0]] = float(line.split()[-1])
    return out


@pytest.fixture(scope="module")
def server(smollm_runtime, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("serve-store"))
    text = (REPO / "samples" / "GPL-3.txt").read_text()
    compress_document(smollm_runtime, TreeStore(store), "gpl", text[:5000], CompressSettings())
    compress_document(smollm_runtime, TreeStore(store), "gpl-end", text[-4000:], CompressSettings())
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w")
    try:
        # two decoder replicas on this 2-core machine: half a CPU reserved each
        srv = ServeProcess(store, ("--replicas", "2", "--replica-cpus", "0.5"), log=log,
                           env={"PYTHONPATH": str(REPO), "CTXTREE_BODY_TIMEOUT_S": "3"}, cwd=str(REPO),
                           timeout_s=300)
    except RuntimeError as e:
        pytest.fail(f"{e}: see {log.name}")
    yield srv.url, srv.proc
    srv.stop()
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
    # two loads started over both replicas: "gpl" (once, then hits: its requests go to the
    # replica holding it) and "none" (failed: not found)
    assert sum(metric(metrics, "ctxtree_tree_cache_misses_total").values()) == 2
    assert sum(metric(metrics, "ctxtree_tree_cache_load_errors_total").values()) == 1
    assert sum(metric(metrics, "ctxtree_tree_cache_hits_total").values()) == 2


def test_requests_go_to_the_replica_that_holds_their_document(server):
    """Serve multiplexing by document: repeated requests for a document land on the one
    replica that loaded it (its tree cache misses stay at 1); a prewarmed document's
    queries go where it was warmed, with no further load."""
    import httpx2

    url, _ = server
    body = {"documents": ["gpl"], "question": "What is this?", "max_tokens": 2}
    replicas = set()
    for _ in range(6):
        r = httpx2.post(url + "/v1/query", json=body, timeout=60)
        assert r.status_code == 200
        replicas.add(r.headers["x-ctxtree-replica"])
        assert r.json()["replica"] == r.headers["x-ctxtree-replica"]
    assert len(replicas) == 1, replicas
    holder = replicas.pop()
    text = httpx2.get(url + "/metrics", timeout=10).text
    assert len(metric(text, "ctxtree_tree_cache_budget_bytes")) == 2  # both replicas have answered by now
    assert metric(text, "ctxtree_tree_cache_misses_total")[holder] == 1
    assert sum(metric(text, "ctxtree_tree_cache_misses_total").values()) == 2  # "gpl" and "none", still

    warm = httpx2.post(url + "/v1/prewarm", json={"documents": ["gpl-end"]}, timeout=60).json()
    warmed_on = warm["replicas"]["gpl-end"]
    time.sleep(2)  # a replica's keys reach the ingress's router asynchronously (pushed every 0.1 s)
    for _ in range(4):
        r = httpx2.post(url + "/v1/query", json={**body, "documents": ["gpl-end"]}, timeout=60)
        assert r.status_code == 200 and r.headers["x-ctxtree-replica"] == warmed_on
    text = httpx2.get(url + "/metrics", timeout=10).text
    assert sum(metric(text, "ctxtree_tree_cache_misses_total").values()) == 3  # the prewarm was the only load


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
    srv = ServeProcess(store, ("--max-ongoing", "1", "--max-queued", "1"), env={"PYTHONPATH": str(REPO)},
                       cwd=str(REPO), timeout_s=240)
    try:
        body = {"documents": ["gpl"], "question": "Summarize it.", "max_tokens": 48}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx2.post(srv.url + "/v1/query", json=body, timeout=120).status_code,
                                     range(8)))
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
        assert set(statuses) <= {200, 503}
        ok = httpx2.post(srv.url + "/v1/query", json={**body, "max_tokens": 2}, timeout=120)
        assert ok.status_code == 200
    finally:
        assert srv.stop() == 0


def test_a_client_that_never_finishes_its_body_gets_408(server):
    """Through Serve's proxy: Content-Length 1000 announced, 10 bytes sent, then silence."""
    import socket
    from urllib.parse import urlparse

    url, _ = server
    where = urlparse(url)
    t0 = time.monotonic()
    with socket.create_connection((where.hostname, where.port), timeout=30) as s:
        s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"documen')
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert time.monotonic() - t0 < 20   # the 3 s bound, not a held slot

def test_shutdown_is_clean(server):
    url, proc = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0

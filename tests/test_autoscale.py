"""Cluster autoscaling for real on one machine: the shipped Serve config (delays
shortened, decoders asking for one GPU each) on a Ray cluster whose autoscaler starts
fake GPU nodes. Under load the decoder deployment scales out and the autoscaler adds GPU
nodes for the new replicas; after the load both scale back in."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from ctxtree.store import TreeStore
from ctxtree.pipelines.document import CompressSettings, compress_document
from ctxtree.serve.launch import free_port
from tests.conftest import REPO
from tests.fake_cluster import FakeCluster

MAX_REPLICAS = 3


def serve_config(store: str, http_port: int) -> dict:
    """infra/serve_config.yaml, with what a one-machine test needs changed and nothing else."""
    cfg = yaml.safe_load((REPO / "infra" / "serve_config.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"           # fake nodes share one host: one proxy port
    cfg["http_options"]["port"] = http_port
    app = cfg["applications"][0]
    app["args"]["store"] = store
    decoder = next(d for d in app["deployments"] if d["name"] == "decoder")
    decoder["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}  # as on a GPU cluster
    # A document's requests stay on the replica holding it until that replica has
    # max_ongoing_requests in flight, then spill over: a small bound makes the few
    # test clients spill onto the new replicas (the shipped 8 matches the batch size).
    decoder["max_ongoing_requests"] = 2
    decoder["autoscaling_config"].update(min_replicas=1, max_replicas=MAX_REPLICAS, target_ongoing_requests=1,
                                         upscale_delay_s=1, downscale_delay_s=5, metrics_interval_s=1,
                                         look_back_period_s=2)
    return cfg


def wait_for(cluster: FakeCluster, check, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    while True:
        state = cluster.probe()
        if check(state) or time.time() > deadline:
            return state
        time.sleep(2)


def running(state: dict) -> int:
    return state["replicas"].get("decoder", {}).get("RUNNING", 0)


def test_decoders_and_gpu_nodes_scale_out_under_load_and_back_in(smollm_runtime, tmp_path):
    store = str(tmp_path / "store")
    text = (REPO / "samples" / "GPL-3.txt").read_text()
    documents = [f"gpl-{i}" for i in range(4)]  # requests for one document stay on the replica holding it
    for i, doc in enumerate(documents):
        compress_document(smollm_runtime, TreeStore(store), doc, text[i * 3000:(i + 1) * 3000], CompressSettings())
    log = open(tmp_path / "cluster.log", "w")
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cluster = FakeCluster(tmp_path, max_gpu_nodes=MAX_REPLICAS, env=env, log=log)
    server = None
    try:
        assert cluster.probe()["gpu_nodes"] == 0  # no GPU node until a replica needs one
        http_port = free_port()
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config(store, http_port)))
        serve_cli = str(Path(sys.executable).parent / "serve")
        server = subprocess.Popen([serve_cli, "run", str(tmp_path / "serve.yaml"), "--address", cluster.address],
                                  env=cluster.env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 300
        while True:  # the first replica needs the first GPU node
            assert server.poll() is None, f"serve run exited: see {log.name}"
            try:
                if httpx2.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert time.time() < deadline, f"no healthy app in 300 s: see {log.name}"
            time.sleep(2)
        before = wait_for(cluster, lambda s: running(s) == 1, 60)
        assert running(before) == 1 and before["gpu_nodes"] == 1, before

        # Load: 6 clients over 4 documents for at most 150 s or 400 requests, stopping once the cluster has
        # scaled out fully (bounded in count and time).
        body = {"documents": documents[:1], "question": "What is this license about?", "max_tokens": 24}
        stop_at = time.time() + 150
        scaled = {"state": before}
        statuses: list[int] = []
        replicas_seen: set[str] = set()

        def client(k: int):
            while time.time() < stop_at and len(statuses) < 400:
                r = httpx2.post(url + "/v1/query", json={**body, "documents": [documents[k % len(documents)]]},
                                timeout=120)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    replicas_seen.add(r.headers["x-ctxtree-replica"])

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, i) for i in range(6)]
            while time.time() < stop_at:
                state = cluster.probe()
                scaled["state"] = state
                if running(state) >= 2 and state["gpu_nodes"] >= 2 and len(replicas_seen) >= 2:
                    break
                time.sleep(3)
            stop_at = 0  # the clients finish their request in flight and stop
            for f in futures:
                f.result()
        out = scaled["state"]
        assert running(out) >= 2 and out["gpu_nodes"] >= 2, (out, f"see {log.name}")
        assert len(replicas_seen) >= 2  # the new replicas answered
        assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))

        # After the load: replicas back to min_replicas, idle GPU nodes removed.
        after = wait_for(cluster, lambda s: running(s) == 1 and s["gpu_nodes"] == 1, 120)
        assert running(after) == 1 and after["gpu_nodes"] == 1, after
        assert httpx2.post(url + "/v1/query", json={**body, "max_tokens": 2}, timeout=120).status_code == 200
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        cluster.stop()
        log.close()

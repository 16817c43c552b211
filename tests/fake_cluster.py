"""A multi-node Ray cluster with a real autoscaler on one machine (Ray's fake_multinode
provider): the head plus GPU worker node types that the autoscaler starts and stops as
raylet processes on this host, each with logical resources ({"CPU": 1, "GPU": 1}).

Ray's own `ray.cluster_utils.AutoscalingCluster` does not work from the wheel (it needs
an example.yaml the wheel lacks, and its start() runs `ray stop --force`, which would end
Ray processes we did not start), so the cluster config is written here and the head is
started with `ray start --block` in its own process group: stopping it ends exactly the
processes it started (the autoscaler's fake nodes are its descendants)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ctxtree.serve.launch import free_port

PROBE = """
import json, sys
import ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
apps = serve.status().applications
replicas = {}
for app in apps.values():
    for name, dep in app.deployments.items():
        replicas[name] = dict(dep.replica_states)
print(json.dumps({"gpu_nodes": sum(1 for n in nodes if n["Resources"].get("GPU", 0) > 0),
                  "nodes": len(nodes), "replicas": replicas}))
"""


def cluster_config(gcs_address: str, max_gpu_nodes: int, head_cpus: int = 2) -> dict:
    empty: dict = {}
    return {
        "cluster_name": "ctxtree-fake",
        "max_workers": max_gpu_nodes,
        "idle_timeout_minutes": 0.1,      # idle fake nodes go after ~6 s (real clusters: minutes)
        "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_launch_config_check": True, "disable_node_updaters": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": empty, "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": empty,
                         "min_workers": 0, "max_workers": max_gpu_nodes},
        },
        "head_node_type": "ray.head.default",
        "head_node": empty, "worker_nodes": empty, "auth": empty, "file_mounts": empty,
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class FakeCluster:
    def __init__(self, workdir: Path, max_gpu_nodes: int, env: dict[str, str], log, timeout_s: float = 120):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1",
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_ADDRESS": self.address}
        config = workdir / "cluster.json"
        config.write_text(json.dumps(cluster_config(self.address, max_gpu_nodes)))
        ray_cli = str(Path(sys.executable).parent / "ray")
        self.proc = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--autoscaling-config={config}", "--disable-usage-stats", "--include-dashboard=false",
             "--num-cpus=2"], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited early (code {self.proc.returncode})")
            try:
                self.probe()
                return
            except RuntimeError:
                if time.time() > deadline:
                    self.stop()
                    raise
                time.sleep(2)

    def probe(self) -> dict:
        """{"gpu_nodes", "nodes", "replicas": {deployment: {state: count}}}, from a fresh driver."""
        out = subprocess.run([sys.executable, "-c", PROBE, self.address], env=self.env, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"cluster probe failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGTERM to the head (it stops what it started), then SIGKILL to any of its
        descendants still alive: only processes this cluster started."""
        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)

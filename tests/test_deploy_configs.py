"""The cluster configs users deploy with are valid for the Ray we pin."""

from __future__ import annotations

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


def test_ray_cluster_yaml_passes_ray_validation():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] == 1
    assert types["cpu_worker"]["resources"] == {} and config["head_node_type"] == "head"
    assert all("RAY_AUTH_MODE" in c for c in config["head_start_ray_commands"] if "ray start" in c)


def test_kuberay_rayjob_runs_the_compress_job():
    job = yaml.safe_load((REPO / "infra" / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("python -m ctxtree.pipelines.compress ")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["gpu"]["minReplicas"] == 0
    limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__


def test_serve_config_is_valid_and_rayservice_carries_the_same_apps():
    from ray.serve.schema import ServeDeploySchema

    local = yaml.safe_load((REPO / "infra" / "serve_config.yaml").read_text())
    ServeDeploySchema(**local)  # Serve's own validation of `serve run` / `serve deploy` configs
    svc = yaml.safe_load((REPO / "infra" / "kuberay" / "rayservice.yaml").read_text())
    v2 = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema(**v2)
    assert v2["applications"] == local["applications"]
    deps = {d["name"]: d for d in local["applications"][0]["deployments"]}
    assert set(deps) == {"ingress", "decoder"}  # the names the deployment classes carry
    dep = deps["decoder"]
    assert dep["max_queued_requests"] > 0 and dep["autoscaling_config"]["min_replicas"] >= 1
    # the import path and args build an application with our typed arguments
    from ctxtree.serve.decoder import ServeArgs, app_builder

    app = local["applications"][0]
    assert ServeArgs(**app["args"]).store == "ctxtree-data"
    assert app_builder(app["args"]) is not None
    assert app["import_path"] == "ctxtree.serve.decoder:app_builder"

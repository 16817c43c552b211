"""Starting or joining Ray, the same way for the compress job, training and the server
(Ray core only; Ray Data's settings live in ctxtree/pipelines/ray_compat.py)."""

from __future__ import annotations

import os

import ray


# Settings the workers need to reach the same storage and model cache as the driver.
# On a real cluster prefer instance roles / IRSA for credentials: then none are set here
# and nothing secret travels in the job's runtime_env.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_EC2_METADATA_DISABLED", "HF_HUB_OFFLINE", "CTXTREE_CACHE",
                 # the HTTP ingress's settings (ctxtree/serve/app.py, limits.py)
                 "CTXTREE_MODEL_ALIASES", "CTXTREE_BODY_TIMEOUT_S", "CTXTREE_MAX_REQUESTS_PER_CLIENT")


def init_ray(address: str | None, dashboard: bool = False) -> None:
    """Connect to `address` (or RAY_ADDRESS, as under `ray job submit`), else start a local Ray.

    dashboard: start a local Ray with its dashboard (Ray Train's controller watches its
    workers through the state API, which the dashboard serves; without it, it logs a
    warning every second)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # "local": always a fresh single-node Ray. A bare ray.init() would instead join
        # whatever cluster /tmp/ray/ray_current_cluster last named, even a dead one.
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                 runtime_env=runtime_env)

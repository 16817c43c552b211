"""`ctxtree serve`: start Ray (local, or join --address), Serve's HTTP proxy on
--host/--port, and the application (HTTP ingress -> decoder replicas, routed by
document); run until SIGINT/SIGTERM, then shut down Serve and Ray cleanly."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ctxtree.cli_args import add_model_args
from ctxtree.kernels.engines import ENGINES
from ctxtree.ray_session import init_ray


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--store", required=True, help="tree store: a local directory or s3://bucket/prefix")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray)")
    p.add_argument("--replicas", type=int, default=1, help="decoder replicas")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per decoder replica")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per decoder replica (1 on GPU nodes)")
    p.add_argument("--max-batch", type=int, default=8, help="requests batched together (1 = no batching)")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="what decodes: torch (default) or vllm (needs ctxtree[vllm] where replicas run)")
    p.add_argument("--max-ongoing", type=int, default=8, help="requests in flight per replica")
    p.add_argument("--max-queued", type=int, default=32,
                   help="requests waiting for a replica; beyond this Serve answers 503")
    add_model_args(p)
    p.add_argument("--cache-mb", type=float, default=1024)
    return p


def main(argv: list[str] | None = None, prog: str = "ctxtree serve") -> int:
    args = build_parser(prog).parse_args(argv)
    from ray import serve

    from ctxtree.serve.decoder import Decoder, ServeArgs
    from ctxtree.serve.ingress import Ingress

    app_args = ServeArgs(store=args.store, model=args.model, adapter=args.adapter, top_chunks=args.top_chunks,
                         reading_from="none" if args.reading_from is None else args.reading_from,
                         layers=args.layers,
                         chunk_len=args.chunk_len, height=args.height, keep=args.keep, codec=args.codec,
                         dtype=args.dtype, device=args.device, cache_mb=args.cache_mb, max_batch=args.max_batch,
                         engine=args.engine)
    init_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    decoder = Decoder.options(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing,
                              max_queued_requests=args.max_queued,
                              ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus})
    serve.run(Ingress.bind(decoder.bind(app_args.model_dump())), name="ctxtree", route_prefix="/")
    print(f"ctxtree: serving {args.store} on http://{args.host}:{args.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("ctxtree: shutting down", flush=True)
    serve.shutdown()
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    from ctxtree.serve.run import main as _main

    sys.exit(_main())

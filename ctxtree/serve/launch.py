"""Running `ctxtree serve` as a child process on loopback, for the demo, the serving
benchmark and the tests: a free port, a wait until /healthz answers, and a clean
SIGINT shutdown of exactly the process we started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, store: str, extra_args: tuple[str, ...] = (), log=subprocess.DEVNULL,
                 env: dict | None = None, cwd: str | None = None, timeout_s: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctxtree.cli", "serve", "--store", store, "--port", str(self.port), *extra_args],
            env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT if log is not subprocess.DEVNULL else subprocess.DEVNULL, cwd=cwd)
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctxtree serve exited early (code {self.proc.returncode})")
            try:
                if httpx2.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"ctxtree serve did not become healthy in {timeout_s:.0f} s")
            time.sleep(1)

    def stop(self, timeout_s: float = 90) -> int | None:
        """SIGINT (Serve and Ray shut down), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

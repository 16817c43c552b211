"""Bounds on what one HTTP client can hold, as plain ASGI middleware around the app.

Ray Serve's HTTP options bound idle keep-alive connections (`keep_alive_timeout_s`,
5 s by default) and, optionally, whole requests (`request_timeout_s`, which would also
cut long answer streams, so it is left unset); they have no body-read timeout and no
per-client limit. This middleware adds both where the app sees the request:

- the request body must arrive within `body_timeout_s` of the request's start (a client
  announcing `Content-Length: 1000` and sending 10 bytes gets 408, not a held slot);
- at most `max_per_client` requests of one client address in flight at once (429 past
  that); 0 turns it off, the default, since behind a load balancer every request comes
  from the balancer's address: cap clients there instead.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import dataclass

BODY_TIMEOUT_ENV = "CTXTREE_BODY_TIMEOUT_S"
MAX_PER_CLIENT_ENV = "CTXTREE_MAX_REQUESTS_PER_CLIENT"


@dataclass(frozen=True)
class ClientLimits:
    body_timeout_s: float = 10.0
    max_per_client: int = 0       # 0: no per-client cap

    def __post_init__(self) -> None:
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.max_per_client < 0:
            raise ValueError(f"max_per_client must be >= 0, got {self.max_per_client}")

    @classmethod
    def from_env(cls) -> "ClientLimits":
        return cls(body_timeout_s=float(os.environ.get(BODY_TIMEOUT_ENV, cls.body_timeout_s)),
                   max_per_client=int(os.environ.get(MAX_PER_CLIENT_ENV, cls.max_per_client)))


class BodyTimeout(Exception):
    """The client did not send its request body in time."""


def _error(status: int, code: str, message: str) -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


class ClientLimitsMiddleware:
    def __init__(self, app, limits: ClientLimits):
        self.app = app
        self.limits = limits
        self.in_flight: Counter[str] = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        cap = self.limits.max_per_client
        if cap and self.in_flight[client] >= cap:
            for message in _error(429, "too_many_requests",
                                  f"more than {cap} requests in flight from this client; retry later"):
                await send(message)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        body_done = False

        async def receive_in_time():
            nonlocal body_done
            if body_done:  # afterwards receive() only reports a disconnect: wait for it freely
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within {self.limits.body_timeout_s:g} s") \
                    from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.in_flight[client] += 1
        try:
            await self.app(scope, receive_in_time, send_tracked)
        except BodyTimeout as e:
            if not started:
                for message in _error(408, "request_timeout", str(e)):
                    await send(message)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]

"""A fault-injecting ASGI middleware shared by the HTTP and zero-shot API fault tests."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any


class FaultInjector:
    """ASGI middleware in front of the real app: the n-th request under ``path`` suffers ``faults[n]``.

    ``500``/``429``/``503``: answered without reaching the app. ``slow``: held past the client's timeout, then
    passed on. ``lost``: computed and billed, then answered 500. ``truncate``: computed, then the
    connection drops mid-body. ``short``: computed, then half the body under a matching Content-Length
    (with or without the checksum header). ``die``: the server goes down (``on_die``) mid-request.
    """

    def __init__(
        self, app: Any, faults: dict[int, str], on_die: Any = None, slow_s: float = 2.0, path: str = "/v1/predict"
    ) -> None:
        self.app, self.faults, self.on_die, self.slow_s, self.path = app, dict(faults), on_die, slow_s, path
        self.n, self.fired = 0, []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path):
            return await self.app(scope, receive, send)
        self.n += 1
        fault = self.faults.get(self.n)
        if fault is None:
            return await self.app(scope, receive, send)
        self.fired.append(fault)
        if fault in ("500", "429", "503"):
            return await reply(send, int(fault), {"error": {"code": "rate_limited" if fault == "429" else "internal"}})
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
            return await self.app(scope, receive, send)
        if fault == "die":
            threading.Thread(target=self.on_die, daemon=True).start()
            await asyncio.sleep(30)  # never answers: cancelled by the shutdown
            return
        sent: list[dict] = []

        async def capture(message: dict) -> None:
            sent.append(message)

        await self.app(scope, receive, capture)  # the real computation, billed
        start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
        if fault == "lost":
            return await reply(send, 500, {"error": {"code": "internal"}})
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        if fault == "truncate":
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            return  # the server closes the connection: the body never completes
        if fault == "short-nosum":
            headers = [(k, v) for k, v in headers if k.lower() != b"x-craft-body-sha256"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body) // 2).encode())]})
        await send({"type": "http.response.body", "body": body[: len(body) // 2]})


class Hostile:
    """An ASGI app answering every path with a fixed ``answer`` = (status, headers, body); counts its calls."""

    def __init__(self) -> None:
        self.answer: tuple[int, list[tuple[bytes, bytes]], bytes] = (200, [], b"{}")
        self.calls = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        status, headers, body = self.answer
        await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def reply(send: Any, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"retry-after", b"0")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def restarting_server(make_app: Any) -> tuple[Any, list[Any], Any]:
    """(server, apps, die_and_restart): ``die_and_restart`` stops the server and starts it again on a fresh
    ``make_app()`` (lost handles, idempotency cache and meters), as a fault injector's ``on_die``."""
    import time

    from craft_sdk.serve import BackgroundServer

    apps = [make_app()]
    srv = BackgroundServer(None)

    def die_and_restart() -> None:
        srv.stop()
        time.sleep(0.3)
        apps.append(make_app())
        srv.start(apps[-1])

    return srv, apps, die_and_restart

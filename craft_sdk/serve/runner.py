"""Running the app: in the foreground for ``craft-sdk serve``, or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

from ..errors import ConfigError, require

logger = logging.getLogger(__name__)


def _import_uvicorn() -> Any:
    return require("uvicorn", "serve", "the prediction server")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: Any) -> int:
    """``port`` as a TCP port number, or a one-line :class:`ConfigError`."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"--port must be a TCP port from 1 to 65535, got {port!r}")
    return port


def _server_config(app: Any) -> Any:
    """The ServerConfig of a craft app, also behind ASGI middleware that keeps it as ``.app``."""
    for _ in range(4):
        config = getattr(getattr(getattr(app, "state", None), "craft", None), "config", None)
        if config is not None:
            return config
        app = getattr(app, "app", None)
    return None


def uvicorn_options(app_config: Any) -> dict[str, Any]:
    """uvicorn settings every server shares: header timeout, no server header, short graceful shutdown."""
    header_timeout = getattr(app_config, "header_timeout_s", 10)
    # an import string, not the class: uvicorn's worker processes must be able to pickle the config
    return {"http": "craft_sdk.serve._h11:HeaderTimeoutH11", "timeout_keep_alive": header_timeout, "server_header": False}


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8765, log_level: str = "info", *, workers: int = 1,
               factory: str | None = None) -> None:
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C / SIGTERM).

    Args:
        app: the ASGI app (ignored when ``factory`` is given).
        workers: uvicorn worker processes; more than one needs ``factory``, the import string of
            a function building the app in each worker (they share meters through the state store).

    Example:
        >>> run_server(create_app(client, keys), port=8765)  # doctest: +SKIP
    """
    uvicorn = _import_uvicorn()
    check_port(port)
    if not is_loopback(host):
        logger.warning("serving on %s: reachable from other machines over plain HTTP; put a TLS proxy in front", host)
    options = uvicorn_options(_server_config(app))
    if workers > 1:
        if factory is None:
            raise ConfigError("several workers need an app factory (craft-sdk serve --workers builds one)")
        uvicorn.run(factory, factory=True, workers=workers, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **options)
        return
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **options)


class BackgroundServer:
    """A uvicorn server on a loopback port in a daemon thread; can be stopped and restarted on the same port.

    Args:
        app: the ASGI app.
        host: address to bind (loopback by default).
        port: 0 picks a free port.

    Example:
        >>> with BackgroundServer(create_app(client, keys)) as server:   # doctest: +SKIP
        ...     HTTPClient(server.url, api_key=key).health()
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, app: Any | None = None, timeout: float = 20.0) -> BackgroundServer:
        """Start serving (``app`` replaces the current app, e.g. a fresh one after a simulated crash)."""
        uvicorn = _import_uvicorn()
        if app is not None:
            self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto set: asyncio then disables Nagle
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1, **uvicorn_options(_server_config(self.app)))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving; connections are refused until :meth:`start` is called again."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

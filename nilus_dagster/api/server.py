"""Console entry `nilus-api`: the API (uvicorn) and the metrics server, in one process and event loop.

Ctrl-C or SIGTERM stops both servers gracefully and the process exits 0 (a second signal forces
the stop). A request uvicorn cannot parse (e.g. a path over its size limit) still gets the API's
`{"error", "code"}` body, not uvicorn's plain-text 400.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Iterator
from dataclasses import replace

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from nilus_dagster.api.app import create_app
from nilus_dagster.api.metrics import create_metrics_app
from nilus_dagster.api.settings import Settings

log = logging.getLogger(__name__)
BAD_REQUEST_BODY = json.dumps(
    {"error": "invalid HTTP request (malformed, or its request line or headers exceed the server's limits)",
     "code": "invalid_request"}
).encode()


class JsonErrorsProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, answering unparseable requests with the API's JSON error body."""

    def send_400_response(self, msg: str) -> None:
        head = [b"HTTP/1.1 400 Bad Request"]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json",
            b"content-length: " + str(len(BAD_REQUEST_BODY)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + BAD_REQUEST_BODY)
        self.transport.close()


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve` (uvicorn re-raises a caught SIGINT after
    its shutdown: a KeyboardInterrupt traceback, and with two servers a forced exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _stop_on_signals(servers: list[uvicorn.Server]) -> None:
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        for server in servers:
            if server.should_exit:
                server.force_exit = True  # a second Ctrl-C: do not wait for open connections
            server.should_exit = True
        log.info("received %s: stopping", sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    metrics_app = create_metrics_app(app.state.services, app.state.metrics_registry)
    api = _Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="info", access_log=False, http=JsonErrorsProtocol
        )
    )
    metrics = _Server(
        uvicorn.Config(
            metrics_app,
            host=settings.metrics_host,
            port=settings.metrics_port,
            log_level=None,
            log_config=None,  # share the API server's logging setup
            access_log=False,
            lifespan="off",
            http=JsonErrorsProtocol,
        )
    )
    _stop_on_signals([api, metrics])
    api_task = asyncio.create_task(api.serve())
    metrics_task = asyncio.create_task(metrics.serve())
    done, _ = await asyncio.wait({api_task, metrics_task}, return_when=asyncio.FIRST_COMPLETED)
    api.should_exit = metrics.should_exit = True  # one stopped (signal or error): stop the other
    await asyncio.gather(api_task, metrics_task, return_exceptions=True)
    for task in done:
        task.result()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nilus-api", description="Serve the Nilus Manager API and metrics.")
    parser.add_argument("--host", help="API host (NILUS_API_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="API port (NILUS_API_PORT, default 8000)")
    parser.add_argument("--metrics-port", type=int, help="Metrics port (NILUS_METRICS_PORT, default 9090)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    overrides = {
        k: v
        for k, v in {"host": args.host, "port": args.port, "metrics_port": args.metrics_port}.items()
        if v is not None
    }
    if overrides:
        settings = replace(settings, **overrides)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the servers took over signals
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()

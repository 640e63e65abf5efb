"""Console entry `nilus-api`: the API (uvicorn) and the metrics server, in one process and event loop."""

from __future__ import annotations

import argparse
import asyncio
import logging

import uvicorn

from nilus_dagster.api.app import create_app
from nilus_dagster.api.metrics import create_metrics_app
from nilus_dagster.api.settings import Settings


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    metrics_app = create_metrics_app(app.state.services, app.state.metrics_registry)
    api = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    )
    metrics = uvicorn.Server(
        uvicorn.Config(
            metrics_app,
            host=settings.metrics_host,
            port=settings.metrics_port,
            log_level=None,
            log_config=None,  # share the API server's logging setup
            access_log=False,
            lifespan="off",
        )
    )
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
        from dataclasses import replace

        settings = replace(settings, **overrides)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()

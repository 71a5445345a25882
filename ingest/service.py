"""``ingest serve``: listener, watcher, relay, admin endpoint and (optionally) the embedded backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from ingest.adapters.spool import Spool
from ingest.config import Settings
from ingest.metrics import Metrics
from ingest.pipeline import wired_relay
from ingest.ports import StateStore, StudyState
from ingest.sweep import sweep_orphans

__all__ = ["admin_app", "serve"]

LOGGER = logging.getLogger(__name__)


def admin_app(metrics: Metrics, store: StateStore, health: dict[str, Any]) -> web.Application:
    """``/healthz`` (200 when every part runs, else 503) and Prometheus ``/metrics``."""

    async def healthz(_: web.Request) -> web.Response:
        ok = all(v == "ok" for v in health.values())
        return web.json_response({"status": "ok" if ok else "degraded", **health}, status=200 if ok else 503)

    async def metrics_view(_: web.Request) -> web.Response:
        try:
            pending = await asyncio.to_thread(store.studies, StudyState.PENDING)
            metrics.relay_queue_depth.set(len(pending))
        except Exception:  # metrics must not fail because the store is down
            LOGGER.debug("could not read queue depth", exc_info=True)
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Run until ``stop`` is set; returns the process exit code."""
    from ingest.adapters.state import open_state_store
    from ingest.cli import open_sink

    metrics = Metrics()
    health: dict[str, Any] = {}
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_state_store(settings.state.url, settings.data_dir, node=settings.state.node_id)
    try:
        # crash leftovers: spool files no instance row points at (before any listener/watcher writes)
        spool_dir = settings.data_dir / "spool"
        if spool_dir.is_dir():
            await asyncio.to_thread(sweep_orphans, Spool(spool_dir), store)
        async with contextlib.AsyncExitStack() as stack:
            sink = await stack.enter_async_context(open_sink(settings))
            health["backend"] = "ok"
            # [endpoint] / [patient]: the Endpoint is found or created now; subjects resolve per study
            relay = await wired_relay(settings, store, sink, metrics=metrics)

            if settings.admin.enabled:
                runner = web.AppRunner(admin_app(metrics, store, health), access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, settings.admin.host, settings.admin.port)
                await site.start()
                stack.push_async_callback(runner.cleanup)
                LOGGER.info("admin endpoint on http://%s:%d (/healthz, /metrics)",
                            settings.admin.host, settings.admin.port)

            tasks: list[asyncio.Task[Any]] = []
            listener = None
            if settings.listener.enabled:
                from ingest.adapters.listener import start_listener

                listener = await start_listener(settings, store, relay, metrics)
                stack.push_async_callback(listener.aclose)
                health["listener"] = "ok"
            if settings.watch.folder is not None:
                from ingest.watcher import run_watcher

                tasks.append(asyncio.create_task(run_watcher(settings, store, relay, metrics, stop)))
                health["watcher"] = "ok"

            relay_task = asyncio.create_task(relay.run_forever(stop))
            health["relay"] = "ok"
            LOGGER.info("ingest serve running (node %s); SIGTERM or Ctrl-C stops it", relay.node)
            await stop.wait()
            LOGGER.info("stopping: no new associations, finishing in-flight work")
            # 1. the listener stops accepting and lets in-flight stores finish (they are acknowledged
            #    only once durable); 2. the watcher stops after its current file; 3. the relay finishes
            #    its current writes. Whatever is left is in the state store for the next start.
            if listener is not None:
                await listener.aclose()
            if tasks:
                _, still = await asyncio.wait(tasks, timeout=10)
                for t in still:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await relay_task
            totals = relay.totals.results
            LOGGER.info(
                "shutdown ◆ %d created ◆ %d updated ◆ %d unchanged ◆ %d retried ◆ %d dead",
                totals["created"], totals["updated"], totals["unchanged"], totals["retried"], totals["dead"],
            )
    finally:
        store.close()
    return 0

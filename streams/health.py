"""The worker's health over HTTP: what Kubernetes probes and `authopt up` shows.

`GET /livez`: 200 while the worker's event loop turns (answering is the proof: the server runs on
that loop). `GET /readyz`: 200 when the worker does its job — its table recovered, not in the middle
of a rebalance, and no attempts partition it owns stalled (records past its position and nothing
taken for the stall window, `streams.progress`); else 503 with the reason. Both answer a short JSON
document. The server is a few lines on asyncio's streams: the worker has no web framework (Faust's
web server is off) and probes need nothing more.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

__all__ = ["Readiness", "serve_health"]

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]  # (ready, why not / what it is doing)
_MAX_REQUEST = 8192


def _response(status: int, doc: dict[str, object]) -> bytes:
    body = json.dumps(doc).encode()
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable", 400: "Bad Request"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve_health(host: str, port: int, readiness: Readiness) -> asyncio.Server:
    """Start the health server on host:port (0: a free port); returns it (its port in `sockets`)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            parts = line.decode("latin-1", "replace").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/livez":
                out = _response(200, {"status": "alive"})
            elif path == "/readyz":
                ready, why = readiness()
                out = _response(
                    200 if ready else 503, {"status": "ready" if ready else "not ready", "detail": why}
                )
            else:
                out = _response(404, {"status": "not found", "paths": ["/livez", "/readyz"]})
            writer.write(out)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:  # a probe must never take the worker down
            log.exception("worker health: request failed")
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST)
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    log.info("worker health on http://%s:%d (/livez, /readyz)", host, bound)
    return server

"""An HTTP reverse proxy on loopback that makes a server look unwell: it answers 503 while `failing`.

Put between the BigQuery client and the emulator, it plays a BigQuery backend outage (the API's
`backendError`) without touching the emulator. Requests pass through unchanged otherwise.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
_OUTAGE = json.dumps(
    {
        "error": {
            "code": 503,
            "message": "The service is currently unavailable (injected by the test).",
            "errors": [{"message": "backend unavailable", "domain": "global", "reason": "backendError"}],
            "status": "UNAVAILABLE",
        }
    }
).encode()


class HttpFaultProxy:
    """Forwards to `target` (http://host:port); `failing = True` answers every request with 503."""

    def __init__(self, target: str) -> None:
        self.target = urlsplit(target)
        self.failing = False
        self.refused = 0  # requests answered 503
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self._body()
                if proxy.failing:
                    proxy.refused += 1
                    return self._answer(503, {"Content-Type": "application/json"}, _OUTAGE)
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                    self._answer(response.status, kept, payload)
                finally:
                    conn.close()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

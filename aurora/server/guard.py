"""ASGI middleware in front of every route: body size limit (413), in-flight limit on inference (429),
and the HTTP-level metrics (requests by route and status, latency to the last byte).

Pure ASGI rather than a Starlette BaseHTTPMiddleware so streamed responses pass through untouched and the
in-flight slot is held until a stream's last byte (or the client's disconnect).
"""
import json
import time

from aurora.server.protocol import error_body


class Guard:
    def __init__(self, app, max_body_bytes: int, max_concurrent: int, limited_paths: tuple[str, ...], metrics):
        self.app = app
        self.max_body_bytes, self.max_concurrent = max_body_bytes, max_concurrent
        self.limited_paths, self.metrics = limited_paths, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._refuse(send, 413, f"request body exceeds {self.max_body_bytes} bytes",
                                      "request_too_large")
        body, more = b"", True
        while more:  # read it all now: chunked bodies have no declared length
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._refuse(send, 413, f"request body exceeds {self.max_body_bytes} bytes",
                                          "request_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        path = scope["path"]
        if path not in self.limited_paths:
            return await self.app(scope, replay, send)
        if self.in_flight >= self.max_concurrent:
            self.metrics.requests.labels(path, "429").inc()
            return await self._refuse(send, 429, f"the server is at its limit of {self.max_concurrent} "
                                                 f"concurrent requests; retry shortly", "too_many_requests",
                                      "rate_limit_error", [(b"retry-after", b"1")])
        status = "disconnected"

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        self.in_flight += 1
        start = time.perf_counter()
        try:
            await self.app(scope, replay, send_status)
        except Exception:
            if status == "disconnected":  # the error handler outside this middleware answers 500
                status = "500"
            raise
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(path, status).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str, type: str = "invalid_request_error",
                      headers: list | None = None):
        body = json.dumps(error_body(message, type, None, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": body})

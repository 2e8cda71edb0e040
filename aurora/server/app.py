"""`create_app(service)`: the OpenAI-compatible HTTP API over a running `Service` (engine + online trainer).

Routes parse, check and format; the work is done by `Generator` (prompt -> engine -> text), the service
(draft admin) and the metrics collector. Everything the service cannot answer well is refused early with
OpenAI's error body: malformed or out-of-range input 400, auth 401/403, unknown model 404, body too large
413, too many requests in flight 429. Streams are Server-Sent Events; a client that disconnects aborts its
generations in the engine.
"""
import contextlib
import hmac
import json
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from aurora import __version__
from aurora.engine.sequence import accept_length
from aurora.server.config import ServeConfig
from aurora.server.generation import Delta, Generator, Prepared, RequestError
from aurora.server.guard import Guard
from aurora.server.logprobs import chat_logprobs, completion_logprobs
from aurora.server.metrics import ServerMetrics, split_status
from aurora.server.protocol import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger(__name__)

INFERENCE_ROUTES = ("/v1/completions", "/v1/chat/completions")


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote input (a parameter name, a model id) holding a lone
    surrogate, which has no UTF-8 form; rendering it must not turn a 400 into a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:  # on a disconnect the stream may be parked at a yield: close it so its generations abort
            await self.body_iterator.aclose()


def create_app(service, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or getattr(service, "config", None) or ServeConfig(wandb="disabled")
    engine = service.engine
    metrics = ServerMetrics(service)
    generator = Generator(engine, {engine.model_name, cfg.target}, metrics)
    created = int(time.time())
    bearer = HTTPBearer(auto_error=False)

    app = FastAPI(title="Aurora", version=__version__,
                  description="OpenAI-compatible serving with an EAGLE3 draft trained online from the traffic.")
    app.state.service, app.state.metrics = service, metrics
    app.add_middleware(Guard, max_body_bytes=cfg.max_body_bytes, max_concurrent=cfg.max_concurrent_requests,
                       limited_paths=INFERENCE_ROUTES, metrics=metrics)

    # ---- errors: always OpenAI's body -------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return ErrorResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err["type"] == "json_invalid" for err in errors):
            return ErrorResponse(error_body("malformed JSON in request body", code="invalid_json"), status_code=400)
        params = [_param(err["loc"]) for err in errors]
        message = "; ".join(f"{p or 'body'}: {err['msg']}" for p, err in list(zip(params, errors))[:5])
        return ErrorResponse(error_body(message, param=params[0] or None, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return ErrorResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code,
                             headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return ErrorResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    # ---- auth --------------------------------------------------------------------------------------
    def api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if credentials is None:
            raise RequestError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        if not hmac.compare_digest(credentials.credentials.encode(), cfg.api_key.encode()):
            raise RequestError(401, "Incorrect API key provided", code="invalid_api_key")

    def admin_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if cfg.admin_key is None:
            raise RequestError(403, "admin endpoints are disabled: start the server with --admin-key",
                               type="permission_error", code="admin_disabled")
        if credentials is None:
            raise RequestError(401, "admin endpoints need 'Authorization: Bearer <admin key>'",
                               type="authentication_error", code="invalid_admin_key")
        if not hmac.compare_digest(credentials.credentials.encode(), cfg.admin_key.encode()):
            raise RequestError(403, "incorrect admin key", type="permission_error", code="invalid_admin_key")

    # without an API key the schema must not announce a security scheme on these routes
    authorized = [Depends(api_key)] if cfg.api_key is not None else []

    # ---- inference ---------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=authorized)
    async def completions(req: CompletionRequest):
        return await _respond(generator.prepare_completion(req), req, "text_completion", _completion_choice)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(req: ChatCompletionRequest):
        return await _respond(generator.prepare_chat(req), req, "chat.completion", _chat_choice)

    def _logprobs(kind: str, p: Prepared, d: Delta, offsets: dict):
        """The delta's tokens' log-probabilities in the route's shape; None when not asked for."""
        if p.params[d.choice].logprobs is None:
            return None
        if kind.startswith("chat"):
            return chat_logprobs(engine.tokenizer, d.logprobs or [])
        start = offsets.get(d.choice, len(p.echo[p.prompt_of(d.choice)]) if p.echo else 0)
        shaped, offsets[d.choice] = completion_logprobs(engine.tokenizer, d.logprobs or [], start)
        return shaped

    async def _respond(p: Prepared, req, kind: str, choice):
        metrics.prompt_tokens.inc(p.prompt_tokens * len(p.params) // len(p.prompts))  # each choice is prefilled
        for ids in p.prompts:
            metrics.request_prompt_tokens.observe(len(ids))
        head = {"id": p.request_id, "created": int(time.time()), "model": engine.model_name}
        stream = generator.stream(p)
        try:  # the first delta comes after prefill: errors up to here still get their own status
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        if req.stream:
            return SSEResponse(_sse(head, kind, choice, p, req.include_usage, first, stream))
        texts, reasons, finals, lps = {}, {}, {}, {}
        async for d in _chain(first, stream):
            texts[d.choice] = texts.get(d.choice, "") + d.text
            reasons[d.choice], finals[d.choice] = d.finish_reason, d.output
            lps.setdefault(d.choice, []).extend(d.logprobs or [])
        choices = [choice(i, texts[i], reasons[i], final=True,
                          logprobs=_logprobs(kind, p, Delta(i, "", None, finals[i], lps[i]), {}))
                   for i in sorted(texts)]
        return {**head, "object": kind, "choices": choices, "usage": _usage(p, finals)}

    async def _sse(head, kind, choice, p, include_usage, first, stream):
        finals, started, offsets = {}, set(), {}
        try:
            async for d in _chain(first, stream):
                finals[d.choice] = d.output
                if not d.text and d.finish_reason is None and d.choice in started and not d.logprobs:
                    continue
                c = choice(d.choice, d.text, d.finish_reason, final=False, first=d.choice not in started,
                           logprobs=_logprobs(kind, p, d, offsets))
                started.add(d.choice)
                yield _event({**head, "object": kind + (".chunk" if kind.startswith("chat") else ""),
                              "choices": [c]})
            if include_usage:
                yield _event({**head, "object": kind + (".chunk" if kind.startswith("chat") else ""),
                              "choices": [], "usage": _usage(p, finals)})
        except RequestError as e:  # headers are sent: report in-band, as OpenAI does
            yield _event(error_body(e.message, e.type, e.param, e.code))
        yield "data: [DONE]\n\n"

    # ---- models, health, metrics, draft ------------------------------------------------------------
    @app.get("/v1/models", dependencies=authorized)
    def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=authorized)
    def model(model: str):
        generator.check_model(model)
        return _model_card()

    def _model_card():
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "aurora",
                "max_model_len": engine.max_model_len}

    @app.get("/health")
    def health():
        """200 "ok" while the engine serves; 200 "degraded" with the reason while it serves but the trainer has
        failed or is backing off (the draft stops learning; serving is unaffected); 503 "unhealthy" while the
        engine's latest step failed or its thread (or server) is gone, "unavailable" while an SGLang child is
        restarted. A later successful step makes it "ok" again; failures stay counted in "engine"."""
        try:
            stats, trainer = split_status(service.draft_status())
            engine_health = _engine_health(engine)
        except Exception as e:
            return ErrorResponse({"status": "unhealthy", "reason": f"{type(e).__name__}: {e}"}, status_code=503)
        ok = engine_health["ok"]
        body = {"status": "ok" if ok else "unhealthy", "model": engine.model_name,
                "draft_version": stats.get("draft_version"), "running": stats.get("running"),
                "waiting": stats.get("waiting"),
                "engine_error": engine_health.get("error"),  # set while the engine's latest step failed
                "engine": engine_health,
                "trainer": None if trainer is None else {
                    "state": trainer.get("state"), "last_error": trainer.get("last_error"),
                    "failures_by_kind": trainer.get("failures_by_kind")}}
        state = engine_health.get("state") or stats.get("engine_state")
        if state in ("restarting", "failed"):  # engine sglang's supervisor
            fault = engine_health.get("error") or stats.get("engine_fault")
            body.update(status="unavailable", reason=f"engine {state}: {fault}")
            return ErrorResponse(body, status_code=503)
        if not ok:
            body["reason"] = f"engine: {engine_health.get('error')}"
            return ErrorResponse(body, status_code=503)
        if trainer is not None and trainer.get("state") in ("failed", "backing_off"):
            what = ("stopped after repeated failures: the draft no longer learns (restart to retry)"
                    if trainer["state"] == "failed" else "backing off after a failure")
            body.update(status="degraded", reason=f"trainer {what}; last error: {trainer.get('last_error')}")
        return ErrorResponse(body, status_code=200)

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/draft", dependencies=authorized)
    def draft():
        return service.draft_status()

    def _admin(action):
        if service.trainer is None:
            raise RequestError(409, "no trainer: the server runs without a draft or without online training",
                               code="no_trainer")
        try:
            result = action()
        except (RuntimeError, ValueError) as e:
            raise RequestError(409, str(e), code="draft_action_failed")
        return {"ok": True, "result": result, "draft": service.draft_status()}

    @app.post("/v1/draft/swap", dependencies=[Depends(admin_key)])
    def draft_swap():
        return _admin(service.swap_now)

    @app.post("/v1/draft/save", dependencies=[Depends(admin_key)])
    def draft_save():
        return _admin(service.save)

    @app.post("/v1/draft/rollback", dependencies=[Depends(admin_key)])
    def draft_rollback():
        return _admin(service.rollback)

    return app


async def _chain(first: Delta, rest):
    yield first
    async for d in rest:
        yield d


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _engine_health(engine) -> dict:
    if hasattr(engine, "health"):
        return engine.health()
    error = getattr(engine, "error", None)
    return {"ok": error is None, "error": error}


def _param(loc) -> str:
    """A validation error's location -> the parameter's dotted name: pydantic adds the union member it tried
    ('str', 'list[int]', 'function-after[...]'), which is no part of the name."""
    parts = [str(x) for x in loc if x != "body" and not (isinstance(x, str) and (
        "[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none")))]
    return ".".join(parts)


def _usage(p: Prepared, finals: dict) -> dict:
    """spec_accept_length is SGLang's: tokens committed by verify rounds / verify rounds, over all choices (the
    token each choice's prefill produced is in completion_tokens but is no verify round's)."""
    completion = sum(len(o.output_ids) for o in finals.values())
    rounds = sum(o.verify_rounds for o in finals.values())
    verified = sum(o.verify_tokens for o in finals.values())
    return {"prompt_tokens": p.prompt_tokens, "completion_tokens": completion,
            "total_tokens": p.prompt_tokens + completion,
            "spec_verify_rounds": rounds, "spec_accept_length": accept_length(verified, rounds)}


def _completion_choice(i: int, text: str, reason: str | None, final: bool, first: bool = False,
                       logprobs: dict | None = None) -> dict:
    return {"index": i, "text": text, "finish_reason": reason, "logprobs": logprobs}


def _chat_choice(i: int, text: str, reason: str | None, final: bool, first: bool = False,
                 logprobs: dict | None = None) -> dict:
    if final:
        return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                "logprobs": logprobs}
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, startup_timeout_s: float = 30.0):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL (tests, scripts)."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()

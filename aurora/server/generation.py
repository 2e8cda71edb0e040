"""Between the HTTP routes and the engine: prompt -> token ids, n generations -> merged stream of text deltas.

The engine speaks token ids; clients speak text. `TextStream` turns a growing list of ids into text deltas
that never split a UTF-8 character and never show a stop string (nor a prefix of one that may still
complete). Stop strings are honoured here as well as in the engine, so the text is right whichever engine
runs; when the server sees one first it aborts the engine request.
"""
import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from aurora.engine.sequence import SHUTDOWN_ERROR, RequestOutput, SamplingParams
from aurora.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest

DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


class TextStream:
    """Token ids in, text deltas out, at a cost per push independent of the output's length: only a short
    window of recent tokens is decoded (the previous push's tokens as context, then the new ones), the
    incremental detokenization of vLLM and TGI; decoding the whole output every push made a long stream
    quadratic (4,096 tokens one at a time on this CPU: ~300 us per token, against ~10 us now)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] = context of the next decode; ids[:_read] are in `decoded`
        self.decoded = ""       # the text of ids[:_read]
        self.text = ""          # text handed out so far
        self.stopped = False    # a stop string was found

    def push(self, new_ids: list[int], final: bool) -> str:
        self.ids += new_ids
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        context, window = decode(self.ids[self._prefix:self._read]), decode(self.ids[self._prefix:])
        if len(window) > len(context) and (final or not window.endswith("\ufffd")):  # else: a UTF-8 character
            self.decoded += window[len(context):]                                  # waits for its next bytes
            self._prefix, self._read = self._read, len(self.ids)
        text = self.decoded
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))  # a hit ends after self.text
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped = text[:min(hits)], True
        elif not final:  # hold back a tail that may still become a stop string
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
        delta = text[len(self.text):] if len(text) > len(self.text) else ""
        self.text += delta
        return delta


@dataclass
class Delta:
    choice: int
    text: str
    finish_reason: str | None   # set on the choice's last delta
    output: RequestOutput       # the engine's latest output for this choice (token counts, spec stats)


@dataclass
class Prepared:
    request_id: str
    prompt_ids: list[int]
    params: list[SamplingParams]   # one per choice
    arrival: float = field(default_factory=time.monotonic)


class Generator:
    def __init__(self, engine, served_models: set[str], metrics=None):
        self.engine = engine
        self.served_models = served_models
        self.metrics = metrics   # ServerMetrics: latency histograms per generation; None = not recorded

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_models:
            raise RequestError(404, f"The model '{model}' does not exist; this server serves "
                                    f"{sorted(self.served_models)}", param="model", code="model_not_found")

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except (TypeError, ValueError, UnicodeError) as e:  # text the tokenizer cannot take is the caller's
            raise RequestError(400, f"{param} cannot be tokenized: {type(e).__name__}: {e}", param=param)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self._check_supported(req)
        if isinstance(req.prompt, str):
            ids = self._encode(req.prompt, "prompt")
        else:
            vocab = len(self.tokenizer)
            if max(req.prompt) >= vocab:
                raise RequestError(400, f"prompt token ids must be < vocabulary size {vocab}", param="prompt")
            ids = list(req.prompt)
        return self._prepare(req, ids, req.max_tokens or DEFAULT_COMPLETION_TOKENS, "cmpl")

    @staticmethod
    def _check_supported(req: SamplingRequest) -> None:
        name = req.unsupported()
        if name is not None:
            raise RequestError(400, f"{name}={getattr(req, name)!r} is not supported by this server; "
                                    f"leave it unset", param=name, code="unsupported_parameter")

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self._check_supported(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # templates raise on conversations they do not support (e.g. role order)
            raise RequestError(400, f"messages do not fit the model's chat template: {e}", param="messages")
        ids = self._encode(text, "messages")
        return self._prepare(req, ids, req.max_completion_tokens or req.max_tokens, "chatcmpl")

    def _prepare(self, req: SamplingRequest, ids: list[int], max_tokens: int | None, kind: str) -> Prepared:
        self.check_model(req.model)
        limit = self.engine.max_model_len
        if not ids:
            raise RequestError(400, "prompt is empty after tokenization", param="prompt")
        if len(ids) >= limit:
            raise RequestError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                    f"{len(ids)} tokens", param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise RequestError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                    f"{len(ids)} tokens and max_tokens is {max_tokens}: lower max_tokens to "
                                    f"at most {limit - len(ids)}", param="max_tokens",
                               code="context_length_exceeded")
        try:
            params = [req.sampling_params(max_tokens, i) for i in range(req.n)]
        except ValueError as e:
            raise RequestError(400, str(e))
        return Prepared(f"{kind}-{uuid.uuid4().hex}", ids, params)

    async def stream(self, p: Prepared) -> AsyncIterator[Delta]:
        """Deltas of all n choices as they come; cancelling the consumer aborts every unfinished choice."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int):
            try:
                async for d in self._choice(p, i):
                    await queue.put(d)
                await queue.put(done)
            except Exception as e:  # handed to the consumer, which re-raises it
                await queue.put(e)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(p.params))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, out: RequestOutput, first: bool, seconds: float) -> None:
        if self.metrics is None:
            return
        if first:
            self.metrics.ttft.observe(seconds)
            if out.queue_time is not None:
                self.metrics.queue_time.observe(out.queue_time)
        else:
            self.metrics.itl.observe(seconds)

    async def _choice(self, p: Prepared, i: int) -> AsyncIterator[Delta]:
        rid = f"{p.request_id}-{i}"
        text = TextStream(self.tokenizer, p.params[i].stop)
        outputs = self.engine.generate(p.prompt_ids, p.params[i], request_id=rid)
        engine_done, last = False, p.arrival
        try:
            async for out in outputs:
                engine_done = out.finished
                if out.new_token_ids:
                    self._observe(out, last == p.arrival, time.monotonic() - last)
                    last = time.monotonic()
                if out.finished and self.metrics is not None and out.finish_reason != "error":
                    self.metrics.request_generation_tokens.observe(len(out.output_ids))
                if out.finished and out.finish_reason == "error":
                    if (out.error or "").startswith(SHUTDOWN_ERROR):
                        raise RequestError(503, out.error, type="server_error", code="engine_unavailable")
                    raise RequestError(500, f"generation failed: {out.error}", type="server_error",
                                       code="generation_failed")
                delta = text.push(out.new_token_ids, out.finished)
                reason = "stop" if text.stopped else (out.finish_reason if out.finished else None)
                yield Delta(i, delta, reason, out)
                if reason is not None:
                    return
        except ValueError as e:  # the engine refuses the request (e.g. too long for its cache)
            raise RequestError(400, str(e))
        except RuntimeError as e:  # the engine is shutting down: come back to another replica / later
            raise RequestError(503, f"engine unavailable: {e}", type="server_error", code="engine_unavailable")
        finally:
            if not engine_done:  # client gone, stop string seen here first, or an error
                self.engine.abort(rid)
            if hasattr(outputs, "aclose"):
                await outputs.aclose()

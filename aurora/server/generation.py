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

from aurora.engine.sequence import (JSON_SCHEMA, LOGIT_BIAS, LOGPROBS, PENALTIES, SHUTDOWN_ERROR, RequestOutput,
                                     SamplingParams)
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
    logprobs: list | None = None  # the engine's log-probabilities of the tokens this delta adds, if asked


@dataclass
class Prepared:
    request_id: str
    prompts: list[list[int]]       # token ids of each prompt (a completion request may send several)
    params: list[SamplingParams]   # one per choice: n per prompt, prompt by prompt
    echo: list[str] | None = None  # per prompt: the text put before its choices' completions (echo)
    arrival: float = field(default_factory=time.monotonic)

    def prompt_of(self, choice: int) -> int:
        return choice * len(self.prompts) // len(self.params)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class Generator:
    def __init__(self, engine, served_models: set[str], metrics=None):
        self.engine = engine
        self.served_models = served_models
        self.metrics = metrics   # ServerMetrics: latency histograms per generation; None = not recorded
        self._vocab: int | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold (added tokens included). Counted once: len() of a transformers 5.12
        tokenizer rebuilds its vocabulary on every call, and per request that was most of the front's time."""
        if self._vocab is None:
            self._vocab = len(self.tokenizer)
        return self._vocab

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_models:
            raise RequestError(404, f"The model '{model}' does not exist; this server serves "
                                    f"{sorted(self.served_models)}", param="model", code="model_not_found")

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except (TypeError, ValueError, UnicodeError) as e:  # text the tokenizer cannot take is the caller's
            raise RequestError(400, f"{param} cannot be tokenized: {type(e).__name__}: {e}", param=param)

    # ---- parameters the engine cannot honour are refused, naming them ------------------------------
    def _refuse_unless(self, feature: str, param: str) -> None:
        if feature not in getattr(self.engine, "features", frozenset()):
            engine = getattr(self.engine, "engine_name", "the built-in engine")
            raise RequestError(400, f"{param} is not supported by {engine}: "
                                    f"speculative decoding stays lossless only if its verify step processes logits "
                                    f"exactly as target-only decoding does, which this engine does not do for "
                                    f"{param} yet (the SGLang engine, --engine sglang, supports it)", param=param,
                               code="unsupported_parameter")

    def check_supported(self, req: SamplingRequest) -> None:
        """Each generation parameter is honoured or refused here; a no-op value (penalty 0, an empty
        logit_bias, logprobs false, response_format text) is accepted by every engine."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                self._refuse_unless(PENALTIES, name)
        if req.logit_bias:
            self._refuse_unless(LOGIT_BIAS, "logit_bias")
        if req.response_format is not None and req.response_format.type != "text":
            self._refuse_unless(JSON_SCHEMA, "response_format")
        if isinstance(req, ChatCompletionRequest):
            if req.top_logprobs and not req.logprobs:
                raise RequestError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
            if req.logprobs:
                self._refuse_unless(LOGPROBS, "logprobs")
            unsupported = "tool calling is not supported: Aurora does not parse tool calls out of the model's text"
            if req.tools:
                raise RequestError(400, f"tools: {unsupported}", param="tools", code="unsupported_parameter")
            if req.functions:
                raise RequestError(400, f"functions: {unsupported}", param="functions",
                                   code="unsupported_parameter")
            if req.tool_choice not in (None, "none", "auto"):
                raise RequestError(400, "tool_choice needs tools, and tools are not supported", param="tool_choice",
                                   code="unsupported_parameter")
            if req.function_call not in (None, "none", "auto"):
                raise RequestError(400, "function_call needs functions, and functions are not supported",
                                   param="function_call", code="unsupported_parameter")
        if isinstance(req, CompletionRequest):
            if req.logprobs is not None:
                self._refuse_unless(LOGPROBS, "logprobs")
                if req.echo:
                    raise RequestError(400, "echo with logprobs is not supported (it needs the prompt's "
                                            "log-probabilities)", param="echo", code="unsupported_parameter")
            if req.suffix:
                raise RequestError(400, "suffix is not supported: the served model has no fill-in-the-middle "
                                        "format", param="suffix", code="unsupported_parameter")
            if req.best_of is not None and req.best_of != req.n:
                raise RequestError(400, f"best_of must equal n ({req.n}): ranking best_of candidates by their "
                                        f"log-probability is not supported", param="best_of",
                                   code="unsupported_parameter")

    # ---- requests -> engine parameters ------------------------------------------------------------
    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self.check_supported(req)
        prompts, echo = [], []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                prompts.append(self._encode(prompt, "prompt"))
                echo.append(prompt)
            else:
                if max(prompt) >= self.vocab_size:
                    raise RequestError(400, f"prompt token ids must be < vocabulary size {self.vocab_size}",
                                       param="prompt")
                prompts.append(list(prompt))
                echo.append(self.tokenizer.decode(prompt, skip_special_tokens=True) if req.echo else "")
        p = self._prepare(req, prompts, req.max_tokens or DEFAULT_COMPLETION_TOKENS, "cmpl")
        p.echo = echo if req.echo else None
        return p

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self.check_supported(req)
        messages = [m.template_dict() for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # templates raise on conversations they do not support (e.g. role order)
            raise RequestError(400, f"messages do not fit the model's chat template: {e}", param="messages")
        for i, m in enumerate(req.messages):  # a template may drop what it does not know: refuse, not lose
            if m.role == "tool" and m.text() not in text:
                raise RequestError(400, f"messages[{i}]: the model's chat template does not render tool messages",
                                   param=f"messages.{i}")
            for c in m.tool_calls or []:
                if c.function.name not in text:
                    raise RequestError(400, f"messages[{i}].tool_calls: the model's chat template does not "
                                            f"render tool calls", param=f"messages.{i}.tool_calls")
        ids = self._encode(text, "messages")
        return self._prepare(req, [ids], req.max_completion_tokens or req.max_tokens, "chatcmpl")

    def _prepare(self, req: SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
                 kind: str) -> Prepared:
        self.check_model(req.model)
        limit = self.engine.max_model_len
        for ids in prompts:
            if not ids:
                raise RequestError(400, "prompt is empty after tokenization", param="prompt")
            if len(ids) >= limit:
                raise RequestError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                        f"{len(ids)} tokens", param="prompt", code="context_length_exceeded")
        longest = max(len(ids) for ids in prompts)
        if max_tokens is None:
            max_tokens = limit - longest
        if longest + max_tokens > limit:
            raise RequestError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                    f"{longest} tokens and max_tokens is {max_tokens}: lower max_tokens to "
                                    f"at most {limit - longest}", param="max_tokens",
                               code="context_length_exceeded")
        try:  # seeds differ per choice of a prompt, and repeat across prompts (each prompt: its own request)
            params = [req.sampling_params(max_tokens, i) for _ in prompts for i in range(req.n)]
        except ValueError as e:
            raise RequestError(400, str(e))
        return Prepared(f"{kind}-{uuid.uuid4().hex}", prompts, params)

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
        prompt = p.prompt_of(i)
        outputs = self.engine.generate(p.prompts[prompt], p.params[i], request_id=rid)
        engine_done, echo, last = False, (p.echo[prompt] if p.echo else ""), p.arrival
        try:
            async for out in outputs:
                engine_done = out.finished
                if out.new_token_ids:
                    first, gap = last == p.arrival, time.monotonic() - last
                    if not first and p.params[i].stream_interval > 1:  # a chunk of tokens: their mean latency
                        gap /= len(out.new_token_ids)
                    self._observe(out, first, gap)
                    last = time.monotonic()
                if out.finished and self.metrics is not None and out.finish_reason != "error":
                    self.metrics.request_generation_tokens.observe(len(out.output_ids))
                if out.finished and out.finish_reason == "error":
                    if (out.error or "").startswith(SHUTDOWN_ERROR):
                        raise RequestError(503, out.error, type="server_error", code="engine_unavailable")
                    raise RequestError(500, f"generation failed: {out.error}", type="server_error",
                                       code="generation_failed")
                if p.params[i].logprobs is not None and out.logprobs is None:
                    raise RequestError(500, "the engine returned no log-probabilities", type="server_error")
                delta = text.push(out.new_token_ids, out.finished)
                reason = "stop" if text.stopped else (out.finish_reason if out.finished else None)
                yield Delta(i, echo + delta, reason, out, out.logprobs)
                echo = ""
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

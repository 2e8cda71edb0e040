"""OpenAI-compatible request bodies (pydantic, strict types, OpenAI's ranges) and the error body.

Every OpenAI parameter that changes what is generated is declared here, with OpenAI's range: the server
honours it or refuses it with a 400 naming it (`Generator.check_supported`), never ignores it. Fields no
model would act on (`user`, `metadata`, ...) are ignored, as OpenAI's own server does. The ranges here are
the API's contract; `SamplingParams` re-checks its own.
"""
import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from aurora.engine.sequence import MAX_TOP_K, SamplingParams

MAX_N = 16
MAX_STOP = 16
INT64 = 2**63


def _encodable(s: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"); such text has no UTF-8 form, so no tokenizer takes it."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: a lone surrogate at index {e.start}") from None
    return s


Text = Annotated[str, AfterValidator(_encodable)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, lt=INT64)]

MAX_PROMPTS = 16          # prompts in one /v1/completions request
MAX_LOGIT_BIAS = 300      # OpenAI's limit on logit_bias entries
# a non-streaming response is written once, at the end: the engine is asked for an output every this many tokens
# only, not every token (each one costs SGLang's scheduler, detokenizer and HTTP hop a message); the outputs in
# between are the supervisor's sign of progress on a long request (aurora/sglang_engine/supervisor.py)
NONSTREAM_INTERVAL = 32


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. OpenAI parameters the engine cannot honour
    are declared too, with OpenAI's ranges: their neutral values are accepted, any other is refused (400)
    rather than silently ignored."""
    model_config = ConfigDict(strict=True)

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0.0, le=2.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="0 or -1: off (vLLM and SGLang use -1)")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False   # vLLM's extension: generate max_tokens even past end-of-sequence (benchmarks)
    capture: bool = True       # Aurora's extension: false = this request leaves no training sample (opt-out; an
                               # evaluation set the draft must never train on, or traffic that must not be learned)
    user: Text | None = None
    presence_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[Text, Finite] | None = None   # token id (a string, as JSON keys are) -> bias in [-100, 100]
    response_format: "ResponseFormat | None" = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for k, b in v.items():
            if not k.isdigit():
                raise ValueError(f"keys are token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"biases are in [-100, 100], got {b} for token {k}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def top_logprobs_wanted(self) -> int | None:
        """None: no log-probabilities; N: each token's and the N most likely alternatives'."""
        return None

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """Engine parameters for choice `choice` of n: seeded requests get seed+choice so choices differ."""
        rf = self.response_format
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=None if self.seed is None else (self.seed + choice) % INT64,
            stop=list(self.stop or []),
            ignore_eos=self.ignore_eos,  # the validator made a str a list; unset stays None
            capture=self.capture,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
            json_schema=None if rf is None else rf.schema_string(),
            logprobs=self.top_logprobs_wanted(),
            stream_interval=1 if self.stream else NONSTREAM_INTERVAL,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class JsonSchema(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type 'json_schema'")
        return self

    def schema_string(self) -> str | None:
        """The JSON schema the output must match, as a string; None: free text. json_object = any object."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return '{"type": "object"}'
        return json.dumps(self.json_schema.schema_ or {"type": "object"})


SamplingRequest.model_rebuild()


class CompletionRequest(SamplingRequest):
    # one prompt (text or token ids of the target's tokenizer) or a list of them: n choices for each
    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]] = Field(..., description="text or token ids, or a list")
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None
    logprobs: int | None = Field(None, ge=0, le=5)   # OpenAI's legacy range

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and not isinstance(v[0], int):
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(len(p) == 0 for p in v):
                raise ValueError("prompts must not be empty")
        flat = v if isinstance(v, list) and isinstance(v[0], int) else \
            [t for p in v if isinstance(p, list) for t in p] if isinstance(v, list) else []
        if any(t < 0 for t in flat):
            raise ValueError("token ids must be >= 0")
        return v

    def prompts(self) -> list[str | list[int]]:
        return [self.prompt] if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else self.prompt

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    arguments: Text   # JSON text, as the model wrote it


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True)
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None   # an assistant turn that called tools
    tool_call_id: str | None = None            # a tool turn: the call it answers

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant turn with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """The message as Hugging Face chat templates take it (tool-call arguments as a mapping)."""
        d = {"role": self.role, "content": self.text()}
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        return d


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None        # the deprecated form of tools
    function_call: str | dict | None = None    # the deprecated form of tool_choice

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}

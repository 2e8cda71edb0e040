"""OpenAI-compatible request bodies (pydantic, strict types, OpenAI's ranges) and the error body.

Only what the engine can honour is declared; unknown fields are ignored as OpenAI's own server does with
fields a model does not use. The ranges here are the API's contract; `SamplingParams` re-checks its own.
"""
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

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
    user: Text | None = None
    frequency_penalty: Finite | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    presence_penalty: Finite | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    logit_bias: dict[Text, Annotated[Finite, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="only an empty map is supported")

    # field -> neutral value(s); _unsupported refuses any other
    NEUTRAL: ClassVar[dict] = {"frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
                               "logit_bias": (None, {})}

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def unsupported(self) -> str | None:
        """The first parameter set to a value this server cannot honour, or None."""
        for name, neutral in self.NEUTRAL.items():
            if getattr(self, name) not in neutral:
                return name
        return None

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """Engine parameters for choice `choice` of n: seeded requests get seed+choice so choices differ."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=None if self.seed is None else (self.seed + choice) % INT64,
            stop=list(self.stop or []),
            ignore_eos=self.ignore_eos,  # the validator made a str a list; unset stays None
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Annotated[int, Field(ge=0, lt=INT64)]] = Field(
        ..., description="text, or token ids of the target's tokenizer")
    logprobs: int | None = Field(None, ge=0, le=5, description="not supported: only null")
    echo: bool = Field(False, description="not supported: only false")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only 1 (or n) is supported")
    suffix: Text | None = Field(None, description="not supported: only null or empty")

    NEUTRAL: ClassVar[dict] = {**SamplingRequest.NEUTRAL, "logprobs": (None,), "echo": (False,), "suffix": (None, "")}

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    def unsupported(self) -> str | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name for max_tokens
    logprobs: bool | None = Field(None, description="not supported: only false or null")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported: only null or 0")

    NEUTRAL: ClassVar[dict] = {**SamplingRequest.NEUTRAL, "logprobs": (None, False), "top_logprobs": (None, 0)}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}

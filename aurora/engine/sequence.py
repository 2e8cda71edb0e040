"""Requests as the engine sees them: sampling parameters, a running sequence, and the output it streams.
Pure Python: no torch here (the scheduler and server read these without touching the device)."""
import itertools
from dataclasses import dataclass, field
from enum import Enum

# What an engine honours beyond the basic sampling parameters, declared in its `features` (the HTTP layer
# refuses the rest, naming them). The built-in engine declares none yet: to stay lossless its speculative
# verify step would have to apply the same logits processing (penalties, bias, a grammar's mask) and report
# the same log-probabilities as target-only decoding, which it does not do yet. SGLang does all four.
LOGPROBS, PENALTIES, LOGIT_BIAS, JSON_SCHEMA = "logprobs", "penalties", "logit_bias", "json_schema"


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    capture: bool = True       # False: this request leaves no training sample (opt-out)
    # logits processing and log-probabilities: honoured by engines that declare them (SGLangEngine.features);
    # the HTTP layer refuses a request that sets them for an engine that does not
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    json_schema: str | None = None   # constrain the output to this JSON schema (a JSON string)
    logprobs: int | None = None      # None: none; N: each output token's log-probability and the top N

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filters(self) -> bool:
        """top-p or top-k truncates the distribution (costs a sort over the vocabulary)."""
        return self.top_p < 1.0 or self.top_k > 0


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    row: int = -1                  # batch row = KV cache slot while running
    verify_rounds: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # accepted drafts at depth j, summed
    # speculative rounds for the training sample: (round_start, proposals, accepted)
    rounds: list[tuple[int, list[int], int]] = field(default_factory=list)
    draft_version: int = 0
    reported: int = 0              # output tokens already streamed to the caller
    seq_id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        if not self.request_id:
            self.request_id = f"req-{self.seq_id}"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def accept_length(self) -> float:
        """SGLang's definition: completion tokens / verify rounds (includes the bonus token)."""
        return len(self.output_ids) / self.verify_rounds if self.verify_rounds else 0.0


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    output_ids: list[int]
    prompt_tokens: int
    finished: bool
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    verify_rounds: int = 0
    accept_length: float = 0.0
    error: str | None = None
    draft_version: int = 0             # the draft version live when the request was admitted
    # per new token, when params.logprobs is set: (token id, log-probability, [(id, log-probability)] top N)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None

"""Requests as the engine sees them: sampling parameters, a running sequence, and the output it streams.
Pure Python: no torch here (the scheduler and server read these without touching the device).

Accept length is SGLang's: tokens committed by verify rounds / verify rounds. The token the prefill
produces is no verify round's work and is left out of both (SGLang's scheduler counts accepted drafts + 1
per verify and nothing at prefill); a request that ends at its prefill token has no accept length (0.0).
"""
import itertools
import math
import time
from dataclasses import dataclass, field
from enum import Enum

# What an engine honours beyond the basic sampling parameters, declared in its `features` (the HTTP layer
# refuses the rest, naming them). The built-in engine declares none yet: to stay lossless its speculative
# verify step would have to apply the same logits processing (penalties, bias, a grammar's mask) and report
# the same log-probabilities as target-only decoding, which it does not do yet. SGLang does all four.
LOGPROBS, PENALTIES, LOGIT_BIAS, JSON_SCHEMA = "logprobs", "penalties", "logit_bias", "json_schema"


MAX_TOP_K = 2**31 - 1
SHUTDOWN_ERROR = "the server shut down before this request finished"  # starts RequestOutput.error of such requests


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    # tokens between two outputs the caller needs: 1 for a streaming client; a non-streaming response needs only
    # the first (its status) and the last. Honoured where each output crosses processes (SGLang's streamed
    # /generate); the built-in engine's outputs stay in process and ignore it
    stream_interval: int = 1

    def __post_init__(self):
        # the ranges are what the engine's per-row tensors hold: an int64 seed, an int32-safe top_k (SGLang keeps
        # top_k in int32), finite floats; a value outside them would fail inside a batched step
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if not (_finite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise ValueError("temperature must be a finite number in [0, 100]")
        if not (_finite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be a finite number in (0, 1]")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError("seed must be an integer in [0, 2^63)")
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise ValueError("stream_interval must be a positive integer")

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
    verify_tokens: int = 0         # tokens produced by verify rounds (not by prefill or depth-0 rounds)
    accepted_per_position: list[int] = field(default_factory=list)  # accepted drafts at depth j, summed
    tried_per_position: list[int] = field(default_factory=list)     # rounds that reached depth j
    # speculative rounds for the training sample: (round_start, proposals, accepted)
    rounds: list[tuple[int, list[int], int]] = field(default_factory=list)
    draft_version: int = 0
    reported: int = 0              # output tokens already streamed to the caller
    error: str | None = None       # why the request failed (finish_reason "error")
    arrival: float = field(default_factory=time.monotonic)
    queue_time: float | None = None  # seconds from arrival to admission into a batch row
    capture: bool = True           # leaves a training sample: decided when the request arrives (LLMEngine.add_request)
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
        """SGLang's definition: tokens committed by verify rounds / verify rounds (the prefill's token and
        plain-decoding rounds are neither)."""
        return accept_length(self.verify_tokens, self.verify_rounds)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    output_ids: list[int]
    prompt_tokens: int
    finished: bool
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    verify_rounds: int = 0
    accept_length: float = 0.0         # verify_tokens / verify_rounds
    error: str | None = None
    draft_version: int = 0             # the draft version live when the request was admitted
    verify_tokens: int = 0             # output tokens committed by verify rounds (the prefill's excluded)
    queue_time: float | None = None    # seconds the request waited for a batch row (None: the engine cannot say)
    # per new token, when params.logprobs is set: (token id, log-probability, [(id, log-probability)] top N)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


def accept_length(verify_tokens: int, verify_rounds: int) -> float:
    """The one formula (SGLang's): tokens committed by verify rounds / verify rounds; 0.0 without a round."""
    return verify_tokens / verify_rounds if verify_rounds else 0.0

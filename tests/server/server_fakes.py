"""Test helpers: fakes with exactly the interfaces the server codes against (AsyncEngine, OnlineTrainer, Service), and a
live uvicorn server on a free loopback port so tests go through real HTTP and the real `openai` client.

FakeEngine "generates" by echoing the prompt's token ids (through the real SmolLM2 tokenizer), a few tokens
per verify round like a speculative engine, honouring max_tokens, stop strings and aborts."""
import asyncio
import os

os.environ["WANDB_MODE"] = "disabled"

from aurora.engine.sequence import RequestOutput, SamplingParams
from aurora.server.app import serve_in_thread
from aurora.server.config import ServeConfig

LOOKAHEAD = 4


class FakeEngine:
    def __init__(self, tokenizer, max_model_len: int = 256, round_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.model_name = "aurora-test"
        self.max_model_len = max_model_len
        self.round_delay = round_delay
        self.draft_version = 0
        self.aborted: set[str] = set()
        self.started: list[str] = []
        self.finished = self.generated = self.running = 0
        self.by_version: dict[int, list[float]] = {}

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError("prompt too long for the KV cache")
        rid = request_id or f"fake-{len(self.started)}"
        self.started.append(rid)
        self.running += 1
        out: list[int] = []
        rounds, reason = 0, None
        try:
            while reason is None:
                await asyncio.sleep(self.round_delay)
                if rid in self.aborted:
                    reason = "abort"
                    new = []
                else:  # like the real engine: the prefill brings one token, then rounds of 1, 2, 3, 4, 1, ...
                    prefill = not out
                    k = 1 if prefill else min(1 + rounds % LOOKAHEAD, params.max_tokens - len(out))
                    new = [prompt_ids[(len(out) + j) % len(prompt_ids)] for j in range(k)]
                    out += new
                    rounds += 0 if prefill else 1
                    text = self.tokenizer.decode(out)
                    if any(s in text for s in params.stop):
                        reason = "stop"
                    elif len(out) >= params.max_tokens:
                        reason = "length"
                verified = len(out) - 1 if rounds else 0
                yield RequestOutput(rid, new, list(out), len(prompt_ids), reason is not None, reason, rounds,
                                    verified / rounds if rounds else 0.0, verify_tokens=verified)
        finally:
            self.running -= 1
            self.finished += 1
            self.generated += len(out)
            if rounds:
                self.by_version.setdefault(self.draft_version, []).append((len(out) - 1) / rounds)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def stats(self) -> dict:
        recent = [a for v in self.by_version.values() for a in v][-100:]
        return {"requests_finished": self.finished, "running": self.running, "waiting": 0,
                "accept_length_recent": sum(recent) / len(recent) if recent else 0.0,
                "accept_length_by_version": {v: sum(a) / len(a) for v, a in self.by_version.items()},
                "accept_rate_by_position": [0.9, 0.7, 0.5, 0.3][:LOOKAHEAD], "tokens_per_second": 123.0,
                "draft_version": self.draft_version, "generated_tokens": self.generated}

    def shutdown(self, drain: bool = True) -> None:
        pass


class FakeTrainer:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.swaps = self.saves = 0
        self.history = [0]

    def status(self) -> dict:
        return {"state": "training", "version": self.engine.draft_version, "steps": 12,
                "loss_per_step": [2.5, 2.9, 3.2, 3.4], "acc_per_step": [0.6, 0.5, 0.4, 0.3],
                "samples_captured": 40, "samples_dropped": 2, "buffer_size": 7, "swaps": self.swaps,
                "swaps_refused": 1, "failures": 0, "last_error": None, "tokens_per_second": 456.0,
                "tokens_trained": 7890, "buffer_bytes": 123456,
                # each version the fake published was predicted a little better than the one before
                "heldout_accept_by_version": {v: 1.0 + 0.25 * v for v in self.history if v},
                "requests_since_swap": 3, "sync_every": 800}

    def swap_now(self):
        self.swaps += 1
        self.engine.draft_version += 1
        self.history.append(self.engine.draft_version)

    def save(self, path=None):
        self.saves += 1

    def rollback(self) -> int:
        if len(self.history) < 2:
            raise RuntimeError("no earlier draft version to roll back to")
        self.history.pop()
        self.engine.draft_version = self.history[-1]
        return self.engine.draft_version

    def stop(self):
        pass


class FakeService:
    def __init__(self, engine: FakeEngine, trainer: FakeTrainer | None):
        self.engine, self.trainer = engine, trainer
        self.shut_down = False

    def draft_status(self) -> dict:
        return {**self.engine.stats(), "trainer": None if self.trainer is None else self.trainer.status()}

    def swap_now(self):
        return self.trainer.swap_now()

    def save(self):
        return self.trainer.save()

    def rollback(self):
        return self.trainer.rollback()

    def shutdown(self):
        self.shut_down = True


def make_service(tokenizer, **engine_kwargs) -> FakeService:
    engine = FakeEngine(tokenizer, **engine_kwargs)
    return FakeService(engine, FakeTrainer(engine))


def test_config(**overrides) -> ServeConfig:
    return ServeConfig(target="smollm2", draft=None, wandb="disabled", **overrides)


test_config.__test__ = False  # a helper, not a test


live_server = serve_in_thread  # the app on a free loopback port in a thread; yields the base URL

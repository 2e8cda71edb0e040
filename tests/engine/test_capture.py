"""What a finished request leaves for the trainer, through the real engine path (batched prefill, speculative
rounds, rows moving when a neighbour finishes, the tree's KV compaction): the aux and final hidden states at
every position equal Hugging Face's `output_hidden_states` over the sample's own tokens, and each round's
record says truthfully which proposals the target accepted (with accepted runs: tests/test_online_learning.py).
The CPU engine's samples used to be views of its capture store, overwritten by the row's next request."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.models.draft import DraftConfig, new_draft
from tests.greedy import check_sample


@pytest.mark.parametrize("topk,nodes", [(1, 4), (3, 7)])
def test_samples_equal_hf_hidden_states_and_rounds_are_truthful(tiny_target_dir, topk, nodes):
    hf = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir)), seed=5)
    eng = LLMEngine(tiny_target_dir, draft, EngineConfig(max_batch=4, max_model_len=128, lookahead=3, topk=topk,
                                                         num_draft_tokens=nodes, dtype="float32",
                                                         adaptive=False))
    samples = []
    eng.on_sample = samples.append
    prompts = [[(3 * i + j) % 90 + 1 for j in range(2 + 5 * i % 13)] for i in range(10)]
    for i, p in enumerate(prompts):  # different lengths: rows finish at different steps and move
        eng.add_request(p, SamplingParams(max_tokens=4 + 7 * i % 19, temperature=0.0, ignore_eos=True))
    while eng.has_work():
        eng.step()
    assert len(samples) == len(prompts)
    for s in samples:
        check_sample(s, hf, eng.target.aux_layers)


def test_a_sample_is_handed_over_after_the_next_step_and_never_left_behind(tiny_target_dir):
    """The host copy of a finished request's states is queued at finish and read after the next step's device
    sync (no wait between rounds); an engine with nothing else to run still takes that step and hands it over."""
    draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir)), seed=5)
    eng = LLMEngine(tiny_target_dir, draft, EngineConfig(max_batch=2, max_model_len=128, lookahead=3))
    samples = []
    eng.on_sample = samples.append
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), "one")
    eng.add_request([8, 9], SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True), "nine")
    finished, steps = [], 0
    while eng.scheduler.has_work():
        earlier = list(finished)
        finished += [o.request_id for o in eng.step() if o.finished]
        steps += 1
        assert [s.request_id for s in samples] == earlier  # handed over one step after its request finished
    assert finished == ["one", "nine"] and steps > 2 and eng.has_work()  # nothing left to run but the hand-over
    eng.step()
    assert [s.request_id for s in samples] == ["one", "nine"] and not eng.has_work()
    assert [s.num_tokens for s in samples] == [4, 11]


def test_requests_are_sampled_for_capture_when_they_arrive(tiny_target_dir):
    """sample_rate times the pacer's rate decides, when a request arrives, whether it leaves a sample: the others
    cost no copy at their finish. A request that opts out never leaves one."""
    class Pacer:
        value = 1.0

        def rate(self):
            return self.value

    draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir)), seed=5)
    eng = LLMEngine(tiny_target_dir, draft, EngineConfig(max_batch=4, max_model_len=128, lookahead=3,
                                                         dtype="float32"))
    samples = []
    eng.on_sample = samples.append
    eng.sample_rate, eng.pacer = 0.5, Pacer()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    seqs = [eng.add_request([i % 90 + 1, 7], params, f"half{i}") for i in range(40)]
    eng.pacer.value = 0.0
    seqs += [eng.add_request([5, 6], params, f"paced{i}") for i in range(5)]
    eng.sample_rate = eng.pacer.value = 1.0
    seqs.append(eng.add_request([5, 6], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                       capture=False), "opted_out"))
    seqs.append(eng.add_request([5, 6], params, "all"))
    while eng.has_work():
        eng.step()
    marked = {s.request_id for s in seqs if s.capture}
    assert sorted(s.request_id for s in samples) == sorted(marked) and eng.capture_admitted == len(marked)
    half = {r for r in marked if r.startswith("half")}
    assert 10 <= len(half) <= 30  # about half of 40 (a seeded draw)
    assert "all" in marked and "opted_out" not in marked and not any(r.startswith("paced") for r in marked)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on a CPU the engine copies a sample's states "
                    "into host memory either way (the tests above check those copies against Hugging Face)")
def test_samples_kept_on_the_gpu_equal_host_ones_and_batch_alike(tiny_target_dir):
    """With the trainer on the engine's GPU the states stay there (no page-locked host copy per request); they hold
    what the host path holds, and the trainer's batch built from them equals the one built from host samples."""
    from aurora.training.ttt import collate

    def serve(on_device: bool):
        draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir)), seed=5)
        eng = LLMEngine(tiny_target_dir, draft, EngineConfig(max_batch=4, max_model_len=128, lookahead=3,
                                                             device="cuda", samples_on_device=on_device))
        samples = []
        eng.on_sample = samples.append
        for i in range(6):  # rows finish at different steps and move
            eng.add_request([(5 * i + j) % 90 + 1 for j in range(3 + 4 * i)],
                            SamplingParams(max_tokens=5 + 6 * i, temperature=0.0, ignore_eos=True), f"r{i}")
        while eng.has_work():
            eng.step()
        return sorted(samples, key=lambda s: s.request_id)

    kept, host = serve(True), serve(False)
    assert len(kept) == len(host) == 6
    for k, h in zip(kept, host):
        assert k.aux_hidden.is_cuda and k.target_hidden.is_cuda and not h.aux_hidden.is_cuda
        assert torch.equal(k.token_ids, h.token_ids)
        assert torch.equal(k.aux_hidden.cpu(), h.aux_hidden) and torch.equal(k.target_hidden.cpu(), h.target_hidden)
    t2d = torch.arange(AutoConfig.from_pretrained(tiny_target_dir).vocab_size)
    a, b = collate(kept, 3, t2d, "cuda"), collate(host, 3, t2d, "cuda")
    for name in ("ids", "aux", "target_hidden", "key_valid", "target_mask", "target_rows", "reject_rows",
                 "reject_token"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name

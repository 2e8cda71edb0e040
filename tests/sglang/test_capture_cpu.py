"""Aurora's side of SGLang capture, on the CPU: wire frames sent over a real unix socket the way the plugin
sends them (prefill chunks, a radix-cache hit, verified blocks with trailing rows, a lost frame) must turn
into exactly the Samples the request's tokens define. Plus the launch command and the swap's flat payload."""
import os
import time
from multiprocessing.connection import Client

import pytest
import torch

from aurora.engine.sequence import SamplingParams
from aurora.server.config import ServeConfig
from aurora.sglang_engine import wire
from aurora.sglang_engine.capture import CaptureCollector
from aurora.sglang_engine.engine import accepted_per_position, sampling_params
from aurora.sglang_engine.launch import LOADER, server_command, server_env
from aurora.sglang_engine.plugin.loader import flatten, unflatten

D = 6  # 3H of a toy target


def _rows(first_pos, n, rid_tag):
    """Row at token index p of request r is filled with a value that names both: p + 1000 * r."""
    return torch.arange(first_pos, first_pos + n, dtype=torch.float32)[:, None].repeat(1, D) + 1000 * rid_tag


class Sender:
    def __init__(self, address):
        self.conn, self.seq = Client(address, family="AF_UNIX"), 0

    def send(self, header, tensors, skip=False):
        self.seq += 1
        if skip:  # the plugin's queue was full: this frame never leaves
            return
        for f in wire.encode(dict(header, seq=self.seq, dropped=0), tensors):
            self.conn.send_bytes(f)


def _wait(cond, timeout=10):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def test_frames_become_samples(tmp_path):
    got = []
    col = CaptureCollector(str(tmp_path / "c.sock"), got.append, timeout_s=5)
    tx = Sender(col.address)
    # request A: prompt of 7 tokens in two prefill chunks (4 + 3); request B: prompt of 6 with 2 cached
    tx.send({"kind": "prefill", "rids": ["c-A"], "prefix": [0], "lens": [4]}, {"hidden": _rows(0, 4, 1)})
    tx.send({"kind": "prefill", "rids": ["c-A", "c-B"], "prefix": [4, 2], "lens": [3, 4]},
            {"hidden": torch.cat([_rows(4, 3, 1), _rows(2, 4, 2)])})
    # decode rounds: ndt 3; block rows are positions start.., accept includes the bonus token
    def block(rid_tag, first, k=3):
        return _rows(first, k, rid_tag)
    tx.send({"kind": "decode", "rids": ["c-A", "c-B"], "ndt": 3},
            {"hidden": torch.cat([block(1, 7), block(2, 6)]), "accept": torch.tensor([3, 1]),
             "draft": torch.tensor([70, 71, 72, 60, 61, 62])})
    tx.send({"kind": "decode", "rids": ["c-A", "c-B"], "ndt": 3},
            {"hidden": torch.cat([block(1, 10), block(2, 7)]), "accept": torch.tensor([2, 2]),
             "draft": torch.tensor([73, 74, 99, 62, 63, 64])})
    _wait(lambda: col.counts["frames"] == 4)
    ids_a = list(range(100, 114))  # 7 prompt + 7 completion tokens: rows needed for positions 0..12
    col.finish("c-A", ids_a, 7, True, 3)
    assert col.pending() == 2 and not got  # A has rows 0..11 only: it waits for one more round
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 3},
            {"hidden": block(1, 12), "accept": torch.tensor([3]), "draft": torch.tensor([1, 2, 3])})
    _wait(lambda: len(got) == 1)
    a = got[0]
    assert a.request_id == "c-A" and a.token_ids.tolist() == ids_a and a.prompt_len == 7 and a.draft_version == 3
    torch.testing.assert_close(a.aux_hidden, _rows(0, 13, 1))          # the trailing row (13, 14) is cut
    assert a.loss_mask.tolist() == [False] * 7 + [True] * 7 and a.target_hidden is None
    assert a.round_start.tolist() == [7, 10, 12]
    assert a.proposals.tolist() == [[71, 72], [74, 99], [2, 3]] and a.accepted.tolist() == [2, 1, 2]
    # B: cached prefix of 2 -> the sample starts at token 2; 6 prompt + 2 completion tokens -> rows 2..6
    ids_b = list(range(200, 208))
    col.finish("c-B", ids_b, 6, False, 3)
    _wait(lambda: len(got) == 2)
    b = got[1]
    assert b.token_ids.tolist() == ids_b[2:] and b.prompt_len == 4 and not b.greedy
    torch.testing.assert_close(b.aux_hidden, _rows(2, 5, 2))
    assert b.loss_mask.tolist() == [False] * 4 + [True] * 2
    # trailing frames for finished requests are ignored, not re-collected
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 3},
            {"hidden": block(1, 15), "accept": torch.tensor([1]), "draft": torch.tensor([1, 2, 3])})
    _wait(lambda: col.counts["frames"] == 6)  # processed in order: the trailing frame came after A's sample
    assert col.pending() == 0 and col.counts["samples"] == 2
    # a lost frame: the requests in flight are dropped and counted, never assembled with a hole
    tx.send({"kind": "prefill", "rids": ["c-C"], "prefix": [0], "lens": [5]}, {"hidden": _rows(0, 5, 3)})
    tx.send({"kind": "decode", "rids": ["c-C"], "ndt": 3}, {"hidden": block(3, 5), "accept": torch.tensor([3]),
                                                           "draft": torch.tensor([1, 2, 3])}, skip=True)
    tx.send({"kind": "decode", "rids": ["c-C"], "ndt": 3}, {"hidden": block(3, 8), "accept": torch.tensor([3]),
                                                           "draft": torch.tensor([1, 2, 3])})
    _wait(lambda: col.counts["frames"] == 8)
    col.finish("c-C", list(range(300, 310)), 5, True, 3)
    assert col.counts["dropped_gap"] == 1 and len(got) == 2
    col.close()


def _logits(first_pos, n, V=16):
    """Verify logits whose top token at token index p is p % V, its runner-up (p + 1) % V."""
    g = torch.Generator().manual_seed(first_pos)
    x = torch.randn(n, V, generator=g)
    for r in range(n):
        x[r, (first_pos + r) % V], x[r, (first_pos + r + 1) % V] = 9.0, 8.0
    return x


def test_decode_frames_carry_the_targets_top_k(tmp_path):
    """Prefill rows carry no distribution (-1); each verified block's accepted rows carry theirs; a frame without
    one (top K not asked for, or a depth change) leaves its rows -1 too."""
    got = []
    col = CaptureCollector(str(tmp_path / "c.sock"), got.append, timeout_s=5)
    tx = Sender(col.address)
    tx.send({"kind": "prefill", "rids": ["c-A"], "prefix": [0], "lens": [5]}, {"hidden": _rows(0, 5, 1)})
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 3},
            {"hidden": _rows(5, 3, 1), "accept": torch.tensor([2]), "draft": torch.tensor([1, 2, 3]),
             **wire.target_topk(_logits(5, 3), 4)})
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 3},
            {"hidden": _rows(7, 3, 1), "accept": torch.tensor([1]), "draft": torch.tensor([1, 2, 3])})
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 3},
            {"hidden": _rows(8, 3, 1), "accept": torch.tensor([3]), "draft": torch.tensor([1, 2, 3]),
             **wire.target_topk(_logits(8, 3), 4)})
    _wait(lambda: col.counts["frames"] == 4)
    col.finish("c-A", list(range(100, 111)), 5, True, 0)  # 11 tokens: rows 0..9
    _wait(lambda: len(got) == 1)
    s = got[0]
    ids = s.target_topk_ids
    assert ids.shape == (10, 4) and ids.dtype == torch.int32
    assert ids[:5].eq(-1).all() and ids[7].eq(-1).all()              # prompt rows; the frame without a top K
    assert ids[[5, 6, 8, 9], 0].tolist() == [5, 6, 8, 9] and ids[[5, 6, 8, 9], 1].tolist() == [6, 7, 9, 10]
    full = torch.cat([_logits(5, 3)[:2], _logits(8, 3)[:2]])
    torch.testing.assert_close(s.target_lse[[5, 6, 8, 9]], torch.logsumexp(full, -1))
    torch.testing.assert_close(s.target_topk_logits[[5, 6, 8, 9]], full.topk(4, -1).values)
    col.close()


def test_frames_with_the_final_state_give_target_hidden(tmp_path):
    """With final_state, every row is [aux 3H | final H] (plugin/final_state.py): the sample's aux_hidden and
    target_hidden are the two parts of the same rows, prompt rows included, and prompt positions are trained."""
    def rows(first, n):  # aux block of row p: p; final block: -p (position-exact, and which block is which)
        p = torch.arange(first, first + n, dtype=torch.float32)[:, None]
        return torch.cat([p.repeat(1, D), -p.repeat(1, D // 3)], 1)
    got = []
    col = CaptureCollector(str(tmp_path / "c.sock"), got.append, timeout_s=5, train_on_prompt=True, final_state=True)
    tx = Sender(col.address)
    tx.send({"kind": "prefill", "rids": ["c-A"], "prefix": [1], "lens": [4]}, {"hidden": rows(1, 4)})
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 3},
            {"hidden": rows(5, 3), "accept": torch.tensor([2]), "draft": torch.tensor([1, 2, 3])})
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 1}, {"hidden": rows(7, 1)})  # a depth-0 round
    _wait(lambda: col.counts["frames"] == 3)
    col.finish("c-A", list(range(100, 109)), 5, True, 0)  # 9 tokens, 1 cached: the sample's rows are 1..7
    _wait(lambda: len(got) == 1)
    s = got[0]
    pos = torch.arange(1, 8, dtype=torch.float32)[:, None]
    torch.testing.assert_close(s.aux_hidden, pos.repeat(1, D))
    torch.testing.assert_close(s.target_hidden, -pos.repeat(1, D // 3))
    assert s.aux_hidden.is_contiguous() and s.target_hidden.is_contiguous() and s.target_topk_ids is None
    assert s.loss_mask.all()  # prompt positions trained too, as the built-in engine marks them
    col.close()
    with pytest.raises(ValueError, match="cannot hold 3 aux states"):
        wire.split_final(torch.zeros(2, 6))


def test_unfinished_requests_time_out_and_are_counted(tmp_path):
    col = CaptureCollector(str(tmp_path / "c.sock"), lambda s: None, timeout_s=0.2)
    tx = Sender(col.address)
    tx.send({"kind": "prefill", "rids": ["c-X"], "prefix": [0], "lens": [3]}, {"hidden": _rows(0, 3, 1)})
    _wait(lambda: col.pending() == 1)
    time.sleep(0.3)
    col.finish("c-Y", [1, 2, 3], 2, True, 0)  # any later event sweeps
    assert col.counts["dropped_incomplete"] == 1
    col.close()


def test_every_admitted_request_is_a_sample_or_a_counted_drop(tmp_path):
    """The books /v1/draft shows and scripts/soak.py checks: admitted = samples + dropped_* + in flight."""
    got = []
    col = CaptureCollector(str(tmp_path / "c.sock"), got.append, timeout_s=0.3)
    tx = Sender(col.address)
    for rid in ("c-ok", "c-aborted", "c-lost", "c-late"):
        col.admit(rid)
    assert col.in_flight() == 4
    tx.send({"kind": "prefill", "rids": ["c-ok", "c-aborted", "c-lost"], "prefix": [0, 0, 0], "lens": [4, 4, 4]},
            {"hidden": torch.cat([_rows(0, 4, 1), _rows(0, 4, 2), _rows(0, 4, 3)])})
    _wait(lambda: col.counts["frames"] == 1)
    col.finish("c-ok", [1, 2, 3, 4, 5], 4, True, 0)  # 4 prompt rows cover positions 0..3: a sample
    col.discard("c-aborted")   # the client went away mid-stream
    col.discard("c-aborted")   # a second report of the same request is not a second drop
    col.discard("c-ok")        # nor is a late discard of a request that already became a sample
    _wait(lambda: len(got) == 1)
    assert col.counts["dropped_aborted"] == 1 and col.in_flight() == 2
    time.sleep(0.4)            # c-lost never finished, c-late never sent a row: both time out once a sweep runs
    col.finish("c-late", [1, 2, 3], 2, True, 0)
    time.sleep(0.4)
    assert col.in_flight() == 0  # in_flight() sweeps: the books close without further traffic
    c = col.counts
    assert c["admitted"] == 4 and c["samples"] == 1 and c["dropped_incomplete"] == 2 and c["dropped_aborted"] == 1
    col.close()


def test_wire_round_trip_bf16():
    t = {"hidden": torch.randn(5, 7).to(torch.bfloat16), "accept": torch.tensor([1, 2]), "e": torch.zeros(0, 3)}
    header, back = wire.decode(wire.encode({"kind": "x"}, t))
    assert header == {"kind": "x"}
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])


def test_server_command_and_env():
    cfg = ServeConfig(engine="sglang", target="x", lookahead=3, tp_size=2, trust_remote_code=True, max_batch=16,
                      sglang_args="--attention-backend triton --mem-fraction-static 0.5")
    argv = server_command(cfg, "/m/target", "/m/draft", 31000)
    joined = " ".join(argv)
    for part in ("sglang.launch_server", "--model-path /m/target", "--tp-size 2", "--trust-remote-code",
                 "--speculative-algorithm EAGLE3", "--speculative-draft-model-path /m/draft",
                 "--speculative-num-steps 3", "--speculative-eagle-topk 1", "--speculative-num-draft-tokens 4",
                 f"--custom-weight-loader {LOADER}", "--max-running-requests 16", "--port 31000",
                 "--attention-backend triton --mem-fraction-static 0.5"):
        assert part in joined, part
    assert "--speculative-algorithm" not in server_command(cfg, "/m/target", None, 31000)
    # SGLang 0.5.17 counts max(topk x steps, draft tokens) = 4 reserved slots against a speculative request's
    # context (compute_num_reserved_tokens): a request Aurora admits at prompt + max_tokens = 2048 must fit
    assert f"--context-length {2048 + 4} " in joined
    assert "--context-length 2048 " in " ".join(server_command(cfg, "/m/target", None, 31000))  # no draft, no slots
    env = server_env("/tmp/a.sock")
    assert env["SGLANG_EXTERNAL_MODEL_PACKAGE"] == "aurora.sglang_engine.plugin"
    assert env["AURORA_CAPTURE_ADDR"] == "/tmp/a.sock" and "AURORA_CAPTURE_ADDR" not in server_env(None)
    assert os.path.isdir(os.path.join(env["PYTHONPATH"].split(os.pathsep)[0], "aurora"))
    assert server_env("/tmp/a.sock", capture_topk=32)[wire.TOPK_ENV] == "32" and wire.TOPK_ENV not in env
    assert wire.TOPK_ENV not in server_env(None, capture_topk=32)  # no capture, no top K
    assert server_env("/tmp/a.sock", capture_final=True)[wire.FINAL_ENV] == "1" and wire.FINAL_ENV not in env
    assert wire.FINAL_ENV not in server_env(None, capture_final=True)


def test_request_mapping_and_stats():
    sp = sampling_params(SamplingParams(max_tokens=9, temperature=0.5, top_p=0.9, top_k=0, seed=3, stop=["\n\n"],
                                        stop_token_ids=[7]))
    assert sp == {"max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "ignore_eos": False,
                  "stop": ["\n\n"], "stop_token_ids": [7], "sampling_seed": 3}
    # histogram: 5 rounds with 0 correct drafts, 3 with 1, 2 with 4 -> draft 1 accepted in 5 rounds, 2-4 in 2
    assert accepted_per_position([5, 3, 0, 0, 2], 4) == [5, 2, 2, 2]
    assert accepted_per_position(None, 2) == [0, 0]


def test_flat_payload_round_trip():
    named = [("fc.weight", torch.randn(4, 6)), ("norm.weight", torch.randn(4)), ("lm_head.weight", torch.randn(3, 4))]
    flat = flatten(named)
    assert len(flat) == 1
    back = unflatten(flat + [("other", torch.ones(2))])
    assert [k for k, _ in back] == ["fc.weight", "norm.weight", "lm_head.weight", "other"]
    for (k, v), (_, w) in zip(named, back):
        assert torch.equal(v, w)


def test_only_the_captured_requests_rows_are_sent(tmp_path):
    """The plugin cuts a batch's rows down to its captured requests (wire.request_rows / segment_rows) before the
    copy: a batch of three with the middle one not captured gives the two samples the full batch would."""
    H, ndt = 3, 2
    full = torch.arange(3 * ndt * H, dtype=torch.float32).view(3 * ndt, H)
    padded = torch.cat([full, torch.full((4, H), -1.0)])  # a CUDA graph's padding rows beyond bs * ndt
    keep, ix = [0, 2], wire.row_index([0, 2], torch.device("cpu"))
    assert ix.tolist() == keep
    ref = torch.cat([full[0:ndt], full[2 * ndt:3 * ndt]])
    torch.testing.assert_close(wire.request_rows(ix, 3, ndt, padded), ref)
    assert wire.request_rows(None, 3, ndt, padded).data_ptr() == padded.data_ptr()  # all kept: a view
    torch.testing.assert_close(wire.request_rows(ix, 3, 1, torch.tensor([5, 6, 7, 0])), torch.tensor([5, 7]))
    seg = torch.arange(9, dtype=torch.float32)[:, None]
    torch.testing.assert_close(wire.segment_rows([0, 2], [2, 3, 4], seg), seg[[0, 1, 5, 6, 7, 8]])
    torch.testing.assert_close(wire.segment_rows([1], [2, 3, 4], seg), seg[2:5])

    got = []
    col = CaptureCollector(str(tmp_path / "c.sock"), got.append, timeout_s=5)
    tx = Sender(col.address)
    rids, lens, prefix = ["c-A", "n-X", "c-B"], [4, 5, 3], [0, 0, 0]
    hidden = torch.cat([_rows(0, 4, 1), _rows(0, 5, 9), _rows(0, 3, 2)])
    tx.send({"kind": "prefill", "rids": [rids[i] for i in keep], "lens": [lens[i] for i in keep],
             "prefix": [prefix[i] for i in keep]}, {"hidden": wire.segment_rows(keep, lens, hidden)})
    block = torch.cat([_rows(4, 3, 1), _rows(5, 3, 9), _rows(3, 3, 2)])  # ndt 3, request-major
    accept, draft = torch.tensor([3, 2, 1]), torch.arange(9)
    tx.send({"kind": "decode", "rids": [rids[i] for i in keep], "ndt": 3},
            {"hidden": wire.request_rows(ix, 3, 3, block), "accept": wire.request_rows(ix, 3, 1, accept),
             "draft": wire.request_rows(ix, 3, 3, draft)})
    _wait(lambda: col.counts["frames"] == 2)
    col.finish("c-A", list(range(100, 108)), 4, True, 1)   # 4 prompt + 4 new: rows 0..6
    col.finish("c-B", list(range(200, 205)), 3, True, 1)   # 3 prompt + 2 new: rows 0..3
    _wait(lambda: len(got) == 2)
    a, b = sorted(got, key=lambda s: s.request_id)
    torch.testing.assert_close(a.aux_hidden, _rows(0, 7, 1))
    assert a.proposals.tolist() == [[1, 2]] and a.accepted.tolist() == [2]
    torch.testing.assert_close(b.aux_hidden, _rows(0, 4, 2))
    assert b.proposals.tolist() == [[7, 8]] and b.accepted.tolist() == [0]
    assert col.counts["frame_errors"] == 0
    col.close()


def test_the_plugin_sends_only_captured_requests(monkeypatch):
    """plugin/eagle3.py's wrappers themselves (SGLang's draft class stubbed: the module imports it), on fake
    prefill and verify batches whose middle request is not captured: the frames carry the captured requests'
    rows, draft tokens and accept lengths only, in batch order."""
    import importlib
    import sys
    import types
    from types import SimpleNamespace as NS

    for name in ("sglang", "sglang.srt", "sglang.srt.models", "sglang.srt.models.llama_eagle3"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["sglang.srt.models.llama_eagle3"].LlamaForCausalLMEagle3 = type("Eagle3", (), {})
    import aurora.sglang_engine.plugin as plugin

    name = "aurora.sglang_engine.plugin.eagle3"
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(plugin, "eagle3", None, raising=False)  # undone after the test: no stubbed plugin stays
    monkeypatch.setitem(sys.modules, name, None)
    del sys.modules[name]
    eagle3 = importlib.import_module(name)
    sent = []
    monkeypatch.setattr(eagle3, "_sender", NS(put=lambda header, tensors: sent.append((header, tensors))))
    reqs = [NS(rid="c-A"), NS(rid="n-X"), NS(rid="c-B")]
    idle = NS(is_idle=lambda: False)
    hidden = torch.cat([_rows(0, 4, 1), _rows(0, 5, 9), _rows(0, 3, 2)])
    eagle3._on_prefill(NS(reqs=reqs, forward_mode=idle, extend_lens=[4, 5, 3], prefix_lens=[0, 2, 0]), hidden)
    (h, t), = sent
    assert h == {"kind": "prefill", "rids": ["c-A", "c-B"], "lens": [4, 3], "prefix": [0, 0]}
    torch.testing.assert_close(t["hidden"], torch.cat([_rows(0, 4, 1), _rows(0, 3, 2)]))
    block = torch.cat([_rows(4, 3, 1), _rows(5, 3, 9), _rows(3, 3, 2), torch.zeros(3, D)])  # + graph padding
    result = NS(logits_output=NS(hidden_states=block, next_token_logits=None), accept_lens=torch.tensor([3, 2, 1, 0]),
                speculative_num_draft_tokens=3)
    eagle3._on_decode(NS(reqs=reqs, spec_info=NS(draft_token=torch.arange(12))), result, 5)
    h, t = sent[1]
    assert h == {"kind": "decode", "rids": ["c-A", "c-B"], "ndt": 3}
    torch.testing.assert_close(t["hidden"], torch.cat([_rows(4, 3, 1), _rows(3, 3, 2)]))
    assert t["accept"].tolist() == [3, 1] and t["draft"].tolist() == [0, 1, 2, 6, 7, 8]
    eagle3._on_decode(NS(reqs=[reqs[1]], spec_info=None), result, 3)  # nobody captured: nothing sent
    assert len(sent) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the GPU machine")
def test_the_row_index_reaches_the_gpu_without_waiting_for_it():
    """Inside SGLang's forward the plugin builds the captured requests' index on the GPU every round that captures
    only some of them: torch's sync debug mode (an independent check) refuses a copy that waits for the stream, as
    torch.as_tensor(list, device=cuda) does, and lets wire.row_index through."""
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            busy = busy @ busy  # the stream has work queued: a sync would wait for it
        ix = wire.row_index([1, 3, 4], torch.device("cuda"))
        with pytest.raises(RuntimeError):
            torch.as_tensor([1, 3, 4], device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ix.tolist() == [1, 3, 4]

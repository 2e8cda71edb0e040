"""Everything on the device: target and draft weights, their slot KV caches, per-row decoding state, and
the speculative round — draft chain, one target verify forward, acceptance, draft extend — as one
function of static shapes. On CUDA each (batch bucket, key-length bucket) of it is captured once as a
CUDA graph: a round is then one replay plus one small device-to-host copy. A prefill of an admission group is
captured too, per (rows, length) bucket, run in staging rows past the serving rows and copied into its own.

Row state lives on the device, indexed by batch row (= KV slot):
  cache_len [S]  tokens committed to both KV caches (n)     next_tok [S]  x[n], sampled but not yet fed
  d_hidden [S,H] draft pre-norm hidden at position n-1 (its logits predict x[n+1]; computed when a round
                 drafts from it, so plain decoding rounds never pay the draft's LM head)
  d_len [S]      positions the draft's KV covers (= cache_len while the draft is current)
Capture stores (aux [S,L,3H], hid [S,L,H], and with a draft the token ids [S,L]) are written at the same
positions as the target's KV.

A round has a depth d <= lookahead chosen per step by the engine (aurora.engine.speculation): d = 0 is plain
decoding, d >= 1 drafts a chain of d tokens and verifies d + 1. A depth-0 round does not touch the draft (a
day-0 draft then costs serving nothing but the capture writes): the draft falls behind, and the first
speculative round after it catches the draft up in one batched extend over the lagging positions, from the
captured aux states and token ids (`_catch_up`). The lag of each row is mirrored on the host (`lag`), so the
catch-up's shape is known without a device sync. Without capture stores the draft is extended every round.
"""
import contextlib
import logging
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from aurora.engine.kv_cache import SlotKVCache, block_mask
from aurora.engine.sampling import pick, probs, sample, uniform, verify_chain, verify_greedy
from aurora.models.draft import Eagle3Draft
from aurora.models.target import TargetModel

log = logging.getLogger(__name__)

# Eager forwards (prefill, catch-up) come in ever new (batch, length) shapes. PyTorch's SDPA prefers cuDNN on
# Hopper, and cuDNN builds an execution plan for each new shape: host time in every layer of nearly every such call
# (results/engine/h200_prefill_cudnn_2026-12-06/). The memory-efficient kernel needs no per-shape plan. The rounds'
# CUDA graphs keep PyTorch's own choice: a graph pays for its plan once, at capture.
_EAGER_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _bucket(n: int, sizes: list[int]) -> int:
    for s in sizes:
        if s >= n:
            return s
    return sizes[-1]


class ModelRunner:
    def __init__(self, target: TargetModel, draft: Eagle3Draft | None, max_batch: int, max_len: int,
                 lookahead: int, capture: bool, cuda_graphs: bool, topk: int = 1, num_draft_tokens: int = 0,
                 fused_rope: bool = False, prefill_rows: int = 8, staged_prefill: bool | None = None):
        self.target, self.draft, self.k = target, draft, lookahead
        self.topk, self.n_draft = topk, num_draft_tokens or lookahead + 1
        self.span = max(self.n_draft, topk * lookahead) + 1  # cache slots a round may write past a row's length
        self.device = dev = target.embed_tokens.weight.device
        self.dtype = dt = target.embed_tokens.weight.dtype
        self.max_len, self.max_batch = max_len, max_batch
        c = target.config
        S = max_batch
        self.batch_sizes = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128) if b < S} | {S})
        self.key_sizes = sorted({min(max_len, 128 * 2 ** i) for i in range(int(math.log2(max(max_len // 128, 1))) + 2)})
        self.use_graphs = cuda_graphs and dev.type == "cuda"
        # A staged prefill (_prefill_staged, a CUDA graph by default on CUDA) runs in staging rows S..S+R-1 past the
        # serving rows, then copies into its rows: a graph cannot take the first row as a number, and its padding rows
        # must land where no one reads. staged_prefill True without graphs runs the same steps eagerly (tests).
        self.staged_prefill = (self.use_graphs if staged_prefill is None else staged_prefill) and prefill_rows > 0
        R = prefill_rows if self.staged_prefill else 0
        self.prefill_batch = sorted({b for b in (1, 2, 4, 8, 16) if b < R} | {R}) if R else []
        self.prefill_lens = sorted({min(max_len, 32 * 2 ** i)
                                    for i in range(int(math.log2(max(max_len // 32, 1))) + 2)})
        self.tcache = SlotKVCache(c.num_hidden_layers, S + R, max_len, c.num_key_value_heads, target.head_dim, dt,
                                  dev, fused_rope=fused_rope)
        self.cache_len = torch.zeros(S, dtype=torch.long, device=dev)
        self.next_tok = torch.zeros(S, dtype=torch.long, device=dev)
        self.active = torch.zeros(S, dtype=torch.bool, device=dev)
        self.temp = torch.zeros(S, device=dev)
        self.top_p = torch.ones(S, device=dev)
        self.top_k = torch.zeros(S, dtype=torch.long, device=dev)
        self.seed = torch.zeros(S, dtype=torch.long, device=dev)
        self.capture = capture
        H = c.hidden_size
        if capture:
            self.aux_store = torch.zeros(S + R, max_len, 3 * H, dtype=dt, device=dev)
            self.hid_store = torch.zeros(S + R, max_len, H, dtype=dt, device=dev)
        self.lazy_draft = draft is not None and capture  # depth-0 rounds skip the draft; catch up from the stores
        self.lag = [0] * S  # host mirror of cache_len - d_len per row
        if draft is not None:
            dc = draft.config
            self.dcache = SlotKVCache(1, S + R, max_len, dc.num_key_value_heads, dc.head_dim, dt, dev)
            self.d_hidden = torch.zeros(S, dc.hidden_size, dtype=dt, device=dev)
            self.d_len = torch.zeros(S, dtype=torch.long, device=dev)
            if self.lazy_draft:
                self.tok_store = torch.zeros(S + R, max_len, dtype=torch.long, device=dev)
        if R:  # a graphed prefill's inputs and outputs; row b of the call is staging row S + b
            self.pf_ids = torch.zeros(R, max_len, dtype=torch.long, device=dev)
            self.pf_lens = torch.ones(R, dtype=torch.long, device=dev)
            self.pf_dst = torch.arange(S, S + R, device=dev)  # where each staging row's prompt goes
            self.pf_temp, self.pf_top_p = torch.zeros(R, device=dev), torch.ones(R, device=dev)
            self.pf_top_k, self.pf_seed = (torch.zeros(R, dtype=torch.long, device=dev) for _ in range(2))
            self.pf_tok = torch.zeros(R, dtype=torch.long, device=dev)
            if draft is not None:
                self.pf_dh = torch.zeros(R, draft.config.hidden_size, dtype=dt, device=dev)
        self.graphs: dict = {}
        self.graph_pool = None
        self.captured = self.caught_up = False
        self.out_tokens = torch.zeros(S, lookahead + 1, dtype=torch.long, device=dev)
        self.out_n = torch.zeros(S, dtype=torch.long, device=dev)
        self.out_props = torch.zeros(S, lookahead, dtype=torch.long, device=dev)

    # ---------------------------------------------------------------- rows
    def set_row(self, row: int, temp: float, top_p: float, top_k: int, seed: int) -> None:
        self.temp[row], self.top_p[row], self.top_k[row], self.seed[row] = temp, top_p, top_k, seed

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row src's sequence moves to row dst; only its first `length` positions (>= its committed tokens) are
        copied: a whole row is max_len positions of every layer (94 MB for SmolLM2 at 2,048 in fp32)."""
        self.tcache.move(src, dst, length)
        if self.draft is not None:
            self.dcache.move(src, dst, length)
            self.d_hidden[dst], self.d_len[dst] = self.d_hidden[src], self.d_len[src]
        if self.capture:
            for t in (self.aux_store, self.hid_store) + ((self.tok_store,) if self.lazy_draft else ()):
                t[dst, :length] = t[src, :length]
        for t in (self.cache_len, self.next_tok, self.active, self.temp, self.top_p, self.top_k, self.seed):
            t[dst] = t[src]
        self.active[src] = False
        self.lag[dst], self.lag[src] = self.lag[src], 0

    def release_row(self, row: int) -> None:
        self.active[row] = False
        self.cache_len[row] = 0
        self.lag[row] = 0

    def read_capture(self, row: int, n: int, on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of a row's first n captured positions (a view would be overwritten by the row's next request).
        on_device (a trainer on this GPU): device copies, queued on the current stream. Else host copies; on CUDA
        queued into page-locked memory, complete once the stream next synchronises (the engine reads them only
        after its next round). Both leave the engine thread at once: a synchronous copy was waited out between two
        rounds for every finished request, and so was page-locking each new host block while the trainer's buffer
        fills (cudaHostAlloc), which a device copy never pays."""
        if on_device or self.device.type != "cuda":
            return self.aux_store[row, :n].clone(), self.hid_store[row, :n].clone()
        return (self.aux_store[row, :n].to("cpu", non_blocking=True),
                self.hid_store[row, :n].to("cpu", non_blocking=True))

    # ---------------------------------------------------------------- forwards
    def _target(self, ids, n, tree, row0=0, depth=None):
        """ids [B,T] written at cache slots n..n+T-1 (n [B]), RoPE positions n + depth (default: the slot)
        -> (hidden, aux); writes KV and capture stores."""
        B, T = ids.shape
        slots = torch.arange(T, device=ids.device)
        pos = n[:, None] + (slots if depth is None else depth)
        wpos = (n[:, None] + slots).clamp_max(self.max_len - 1)
        S = self._keys
        h, aux = self.target(ids, pos, self.tcache.attend(row0, wpos, block_mask(n, tree, S)))
        if self.capture:
            rows = torch.arange(row0, row0 + B, device=ids.device)[:, None]
            self.aux_store[rows, wpos] = aux
            self.hid_store[rows, wpos] = h
            if self.lazy_draft:
                self.tok_store[rows, wpos] = ids
        return h, aux

    def _draft(self, ids, g, n, tree, row0=0, offset=0, pos_offset=None, with_logits=True):
        """ids [B,T] written at draft cache slots n+offset.., RoPE positions n+offset.. unless pos_offset is
        given (tree nodes of one depth share a position); tree [B,T,M] masks the block of M slots from n."""
        B, T = ids.shape
        slots = n[:, None] + offset + torch.arange(T, device=ids.device)
        pos = slots if pos_offset is None else (n + pos_offset)[:, None].expand(B, T)
        wpos = slots.clamp_max(self.max_len - 1)
        return self.draft(ids, g, pos, self.dcache.attend(row0, wpos, block_mask(n, tree, self._keys)), with_logits)

    def _eager(self):
        """The attention backends of a forward outside the rounds' CUDA graphs (_EAGER_SDPA)."""
        return sdpa_kernel(_EAGER_SDPA) if self.device.type == "cuda" else contextlib.nullcontext()

    def _q(self, d_logits, temp, top_p, top_k):
        """Draft logits [B,Vd] -> draft probabilities over the target vocabulary [B,V]."""
        q_d = probs(d_logits[:, None], temp, top_p, top_k)[:, 0]
        V = self.target.config.vocab_size
        ids = torch.arange(q_d.shape[-1], device=q_d.device) + self.draft.d2t
        return torch.zeros(q_d.shape[0], V, device=q_d.device).index_copy_(1, ids, q_d)

    @torch.inference_mode()
    def prefill(self, row0: int, prompts: list[list[int]], greedy: bool, filtering: bool,
                with_draft: bool = True) -> list[int]:
        """Fill rows row0.. with their prompts in one forward (right-padded; a padded query still sees its own
        row's real keys, and padded slots are overwritten by decoding before anyone reads them), pick each
        row's x[P]; returns the tokens (one sync, at admission only). with_draft False (while the engine decodes
        plainly): the draft is left for the first speculative round to catch up. On CUDA a group that fits the
        staging rows replays a CUDA graph of its (rows, length) bucket (_prefill_graphed); otherwise it runs eagerly."""
        B, dev = len(prompts), self.device
        P = max(len(p) for p in prompts)
        drafted = self.draft is not None and (with_draft or not self.lazy_draft)
        r = slice(row0, row0 + B)
        if self.staged_prefill and B <= self.prefill_batch[-1] and P <= self.prefill_lens[-1]:
            tok, dh, lens = self._prefill_graphed(row0, prompts, greedy, filtering, drafted)
        else:
            ids = torch.zeros(B, P, dtype=torch.long)
            for b, p in enumerate(prompts):
                ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
            with self._eager():
                tok, dh = self._prefill_forward(ids.to(dev), lens, row0, _bucket(P + 1, self.key_sizes),
                                                (self.temp[r], self.top_p[r] if filtering else None, self.top_k[r],
                                                 self.seed[r]), greedy, drafted)
        if drafted:
            self.d_hidden[r] = dh
        if self.draft is not None:
            self.d_len[r] = lens if drafted else 0
        self.cache_len[r], self.next_tok[r], self.active[r] = lens, tok, True
        out = tok.tolist()
        for b, p in enumerate(prompts):
            self.lag[row0 + b] = 0 if drafted else len(p)
        return out

    def _prefill_forward(self, ids, lens, row0: int, keys: int, sampling, greedy: bool, drafted: bool):
        """ids [B,P] (lens [B]) into rows row0.. of the caches and stores -> (each row's x[P] [B], the draft's
        hidden at its last prompt position [B,Hd] or None). sampling: the rows' (temp, top_p or None, top_k, seed)."""
        B, P = ids.shape
        dev = ids.device
        n0 = torch.zeros(B, dtype=torch.long, device=dev)
        self._keys = keys
        ar = torch.arange(P, device=dev)
        tree = (ar[None, :, None] >= ar[None, None, :]) & (ar[None, None, :] < lens[:, None, None])  # causal, own keys
        bi, last = torch.arange(B, device=dev), lens - 1
        h, aux = self._target(ids, n0, tree, row0=row0)
        tok = pick(self.target.logits(h[bi, last]), *sampling, last, greedy)
        if not drafted:
            return tok, None
        d_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # draft position t reads x[t+1]: the new token last
        d_ids[bi, last] = tok
        dh, _ = self._draft(d_ids, self.draft.project(aux), n0, tree, row0=row0, with_logits=False)
        return tok, dh[bi, last]

    def _prefill_graphed(self, row0: int, prompts: list[list[int]], greedy: bool, filtering: bool, drafted: bool):
        """The prefill as a CUDA graph replay: on a small target an eager forward costs many times its GPU work in
        host time (results/engine/h100_prefill_eager_2026-12-07/), and every admission group pays it. The group is
        padded to a (rows, length) bucket; its inputs go to static buffers, the graph runs the forward in the staging
        rows and copies what it wrote into the group's rows (padding rows copy onto themselves). Returns the rows'
        (tokens, draft hidden or None, lengths), views of the static buffers."""
        B, S = len(prompts), self.max_batch
        Bb, Pb = _bucket(B, self.prefill_batch), _bucket(max(len(p) for p in prompts), self.prefill_lens)
        host = torch.zeros(Bb, Pb + 2, dtype=torch.long)  # ids, then length, then destination row: one copy
        host[:, Pb], host[:, Pb + 1] = 1, torch.arange(S, S + Bb)
        for b, p in enumerate(prompts):
            host[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            host[b, Pb], host[b, Pb + 1] = len(p), row0 + b
        host = host.to(self.device)
        self.pf_ids[:Bb, :Pb], self.pf_lens[:Bb], self.pf_dst[:Bb] = host[:, :Pb], host[:, Pb], host[:, Pb + 1]
        r = slice(row0, row0 + B)
        for buf, src in ((self.pf_temp, self.temp), (self.pf_top_p, self.top_p), (self.pf_top_k, self.top_k),
                         (self.pf_seed, self.seed)):
            buf[:B] = src[r]
        filtering = filtering and not greedy  # a greedy pick reads no filter
        if self.use_graphs:  # a capture's warm-up run is this prefill (replay runs it again: same inputs, same writes)
            self._prefill_graph(Bb, Pb, greedy, filtering, drafted)[0].replay()
        else:
            self._prefill_staged(Bb, Pb, greedy, filtering, drafted)
        return self.pf_tok[:B], (self.pf_dh[:B] if drafted else None), self.pf_lens[:B]

    def _prefill_graph(self, Bb: int, Pb: int, greedy: bool, filtering: bool, drafted: bool):
        """The graph of one prefill bucket, captured now if it is new -> (graph, captured now)."""
        key = ("prefill", Bb, Pb, greedy, filtering, drafted)
        if key in self.graphs:
            return self.graphs[key], False
        self.graphs[key] = self._capture(lambda _: self._prefill_staged(Bb, Pb, greedy, filtering, drafted), Bb)
        return self.graphs[key], True

    def _prefill_staged(self, Bb: int, Pb: int, greedy: bool, filtering: bool, drafted: bool) -> None:
        S = self.max_batch
        sampling = (self.pf_temp[:Bb], self.pf_top_p[:Bb] if filtering else None, self.pf_top_k[:Bb], self.pf_seed[:Bb])
        tok, dh = self._prefill_forward(self.pf_ids[:Bb, :Pb], self.pf_lens[:Bb], S, Pb, sampling, greedy, drafted)
        self.pf_tok[:Bb] = tok
        dst, stage = self.pf_dst[:Bb], slice(S, S + Bb)
        caches = [self.tcache] + ([self.dcache] if drafted else [])
        for t in [x for c in caches for x in (c.k, c.v)]:
            t[:, dst, :Pb] = t[:, stage, :Pb].clone()  # a view of t itself: index_put refuses the overlap on CUDA
        if self.capture:
            for t in (self.aux_store, self.hid_store) + ((self.tok_store,) if self.lazy_draft else ()):
                t[dst, :Pb] = t[stage, :Pb].clone()
        if drafted:
            self.pf_dh[:Bb] = dh

    def _decode_round(self, B: int):
        """Depth 0: feed x[n], sample x[n+1]. The draft is extended over it only when it cannot catch up later."""
        n, x = self.cache_len[:B], self.next_tok[:B]
        tree = torch.ones(B, 1, 1, dtype=torch.bool, device=self.device)
        h, aux = self._target(x[:, None], n, tree)
        tok = pick(self.target.logits(h[:, 0]), self.temp[:B], self._tp(self.top_p[:B]), self.top_k[:B],
                   self.seed[:B], n, self._greedy_only)
        if self.draft is not None and not self.lazy_draft:
            self._commit(B, tok[:, None], aux, torch.zeros_like(tok), tok[:, None][:, :0])
            return
        self.out_tokens[:B, 0] = tok
        self.out_n[:B] = 0
        self.next_tok[:B] = tok
        self.cache_len[:B] += self.active[:B].long()

    def _catch_up(self, B: int, budget: int = 8192) -> None:
        """Extend the draft over each lagging row's positions d_len..cache_len-1, reading the captured aux states
        and token ids; the rows are then current. Eager (the shape is the largest lag), in forwards of at most
        `budget` padded tokens over consecutive rows."""
        lagging = [r for r in range(B) if self.lag[r]]
        while lagging:
            r0, G = lagging[0], self.lag[lagging[0]]
            r1 = r0 + 1
            while r1 < B and (r1 + 1 - r0) * max(G, self.lag[r1]) <= budget:
                G, r1 = max(G, self.lag[r1]), r1 + 1
            with self._eager():
                self._catch_up_rows(r0, r1, G)
            lagging = [r for r in lagging if r >= r1]

    def _catch_up_rows(self, r0: int, r1: int, G: int) -> None:
        dev = self.device
        n, start = self.cache_len[r0:r1], self.d_len[r0:r1]
        j = torch.arange(G, device=dev)
        lag = n - start
        valid = j[None] < lag[:, None]
        pos = (start[:, None] + j).clamp_max(self.max_len - 1)
        nxt = (pos + 1).clamp_max(self.max_len - 1)
        rows = torch.arange(r0, r1, device=dev)[:, None]
        ids = torch.where(nxt == n[:, None], self.next_tok[r0:r1, None], self.tok_store[rows, nxt])  # x[t+1] at t
        tree = (j[None, :, None] >= j[None, None, :]) & valid[:, None, :]
        dh, _ = self._draft(ids, self.draft.project(self.aux_store[rows, pos]), start, tree, row0=r0,
                            with_logits=False)
        last = dh[torch.arange(r1 - r0, device=dev), (lag - 1).clamp_min(0)]
        self.d_hidden[r0:r1] = torch.where((lag > 0)[:, None], last, self.d_hidden[r0:r1])
        self.d_len[r0:r1] = n
        self.lag[r0:r1] = [0] * (r1 - r0)

    def _spec_round(self, B: int, k: int):
        dev = self.device
        n, x = self.cache_len[:B], self.next_tok[:B]
        temp, top_p, top_k, seed = self.temp[:B], self.top_p[:B], self.top_k[:B], self.seed[:B]
        greedy = temp <= 0
        one = torch.ones(B, 1, 1, dtype=torch.bool, device=dev)
        # 1. draft chain: d1 from the extend output at n-1; step j runs at position n+j-1 on d_j
        h = self.d_hidden[:B]
        logits = self.draft.logits(h)
        toks, qs = [], []
        for j in range(k):
            t = self.draft.to_target_ids(logits.argmax(-1))
            if not self._greedy_only:
                q = self._q(logits, temp, self._tp(top_p), top_k)  # [B,V]
                t = torch.where(greedy, t, sample(q, uniform(seed, n + j, 4, q.shape[-1])))
                qs.append(q)
            toks.append(t)
            if j < k - 1:
                hh, ll = self._draft(t[:, None], h[:, None], n + j, one)
                h, logits = hh[:, 0], ll[:, 0]
        drafts = torch.stack(toks, 1)  # [B,k]
        # 2. verify [x[n], d1..dk] at n..n+k in one target forward
        chain = torch.ones(B, k + 1, k + 1, dtype=torch.bool, device=dev).tril_()
        hid, aux = self._target(torch.cat([x[:, None], drafts], 1), n, chain)
        tl = self.target.logits(hid)  # [B,k+1,V]
        if self._greedy_only:
            tokens, n_acc = verify_greedy(tl, drafts)
        else:
            tokens, n_acc = verify_chain(tl, drafts, torch.stack(qs, 1), greedy, temp, self._tp(top_p), top_k, seed, n)
        self._commit(B, tokens, aux, n_acc, drafts)

    def _commit(self, B: int, tokens, aux, n_acc, proposals):
        """Draft extend over the verified positions n..n+n_acc (tokens [B,k+1], aux [B,k+1,3H] in position
        order; rows past n_acc are masked garbage, overwritten next round), then advance the row state."""
        n, k1 = self.cache_len[:B], tokens.shape[1]
        chain = torch.ones(B, k1, k1, dtype=torch.bool, device=self.device).tril_()
        dh, _ = self._draft(tokens, self.draft.project(aux), n, chain, with_logits=False)
        ar = torch.arange(B, device=self.device)
        self.d_hidden[:B] = dh[ar, n_acc]
        self.next_tok[:B] = tokens[ar, n_acc]
        self.cache_len[:B] += (n_acc + 1) * self.active[:B].long()
        self.d_len[:B] = self.cache_len[:B]
        self.out_tokens[:B, :k1] = tokens
        self.out_n[:B] = n_acc
        self.out_props[:B, :proposals.shape[1]] = proposals

    def _tree_round(self, B: int):
        """topk > 1: grow a draft tree (top-k children per frontier node, the k best paths kept per depth, as
        SGLang builds it), keep the num_draft_tokens-1 best nodes by path log-probability, verify them in one
        target forward with a tree mask, walk the accepted path, and move its KV into place.

        Acceptance treats each child as a deterministic proposal: at a node with target distribution p the
        children are tried in score order, child c accepted with probability p(c), else p <- normalize(p
        without c); if none is accepted the token is drawn from what is left of p. That keeps sampling
        exactly distributed as the target; greedy rows accept the child equal to the target's argmax."""
        K, k, N, dev = self.k, self.topk, self.n_draft, self.device
        n, x = self.cache_len[:B], self.next_tok[:B]
        temp, top_p, top_k, seed = self.temp[:B], self.top_p[:B], self.top_k[:B], self.seed[:B]
        greedy = temp <= 0
        ar = torch.arange(B, device=dev)
        M = K * k
        eye = torch.eye(M, dtype=torch.bool, device=dev)
        anc = torch.zeros(B, M, M, dtype=torch.bool, device=dev)       # draft-node ancestry (self included)
        tok = torch.zeros(B, M, dtype=torch.long, device=dev)           # target ids
        score = torch.zeros(B, M, device=dev)                           # path log-probability
        parent = torch.full((B, M), -1, dtype=torch.long, device=dev)   # node index, -1 = root
        logq = torch.log_softmax(self.draft.logits(self.d_hidden[:B]).float(), -1)
        s, d_ids = logq.topk(k, dim=-1)                                 # depth-1 frontier [B,k]
        par = torch.full((B, k), -1, dtype=torch.long, device=dev)
        h = self.d_hidden[:B, None].expand(B, k, -1)
        for j in range(K):
            idx = j * k + torch.arange(k, device=dev)
            tok[:, idx] = self.draft.to_target_ids(d_ids)
            score[:, idx] = s
            parent[:, idx] = par
            up = anc.gather(1, par.clamp_min(0)[..., None].expand(B, k, M)) & (par >= 0)[..., None]
            anc[:, idx] = up | eye[idx]
            if j == K - 1:
                break
            hh, ll = self._draft(tok[:, idx], h, n, anc[:, idx], offset=j * k, pos_offset=j)
            cs, cid = torch.log_softmax(ll.float(), -1).topk(k, dim=-1)  # [B,k,k]
            s, best = (s[..., None] + cs).flatten(1).topk(k, dim=-1)
            d_ids = cid.flatten(1).gather(1, best)
            par = j * k + best // k
            h = hh.gather(1, (best // k)[..., None].expand(B, k, hh.shape[-1]))
        depth = torch.arange(K, device=dev).repeat_interleave(k) + 1
        # the N-1 best nodes; a parent always outranks its child (ties: the shallower first)
        sel = (score - depth * 1e-6).topk(N - 1, dim=-1).indices        # [B,N-1]
        ids_v = torch.cat([x[:, None], tok.gather(1, sel)], 1)          # [B,N]
        depth_v = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), depth[sel]], 1)
        par_sel = parent.gather(1, sel)
        par_v = torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=dev),
                           torch.where(par_sel < 0, 0, 1 + (sel[:, None, :] == par_sel[..., None]).long().argmax(-1))], 1)
        tree = torch.ones(B, N, N, dtype=torch.bool, device=dev)
        tree[:, 1:, 1:] = anc.gather(1, sel[..., None].expand(B, N - 1, M)).gather(2, sel[:, None, :].expand(B, N - 1, N - 1))
        tree[:, 0, 1:] = False
        hid, aux = self._target(ids_v, n, tree, depth=depth_v)
        tl = self.target.logits(hid)                                    # [B,N,V]
        top = tl.argmax(-1)
        p_all = None if self._greedy_only else probs(tl, temp, self._tp(top_p), top_k)
        cur = torch.zeros(B, dtype=torch.long, device=dev)
        alive = torch.ones(B, dtype=torch.bool, device=dev)
        n_acc = torch.zeros(B, dtype=torch.long, device=dev)
        path = torch.zeros(B, K, dtype=torch.long, device=dev)
        first = torch.full((B, K), -1, dtype=torch.long, device=dev)  # first child tried per depth (-1: none)
        p_cur = None if p_all is None else p_all[:, 0]
        for d in range(K):
            taken = torch.zeros(B, dtype=torch.bool, device=dev)
            chosen = torch.zeros(B, dtype=torch.long, device=dev)
            seen = torch.zeros(B, dtype=torch.bool, device=dev)
            for j in range(1, N):
                child = (par_v[:, j] == cur) & alive & ~taken
                first[:, d] = torch.where(child & ~seen, j, first[:, d])
                seen |= child
                ok = ids_v[:, j] == top[ar, cur]
                if p_cur is not None:
                    pj = p_cur[ar, ids_v[:, j]]
                    s_ok = uniform(seed, n * N + d * N + j, 5, 1)[:, 0] < pj
                    ok = torch.where(greedy, ok, s_ok)
                    rejected = child & ~ok & ~greedy
                    drop = torch.zeros_like(p_cur).scatter_(1, ids_v[:, j, None], 1.0) * rejected[:, None]
                    p_cur = p_cur * (1 - drop)
                    p_cur = p_cur / p_cur.sum(-1, keepdim=True).clamp_min(1e-30)
                take = child & ok
                chosen = torch.where(take, j, chosen)
                taken |= take
            alive &= taken
            path[:, d] = chosen
            n_acc += alive.long()
            cur = torch.where(alive, chosen, cur)
            if p_cur is not None:
                p_cur = torch.where(alive[:, None], p_all[ar, cur], p_cur)
        last = top[ar, cur]
        if p_cur is not None:
            last = torch.where(greedy, last, sample(p_cur, uniform(seed, n, 2, p_cur.shape[-1])))
        steps = torch.arange(K, device=dev)
        tokens = torch.cat([ids_v.gather(1, path), x[:, None]], 1)
        tokens[ar, n_acc] = last
        pick = torch.where(steps[None] < n_acc[:, None], path, first)  # the accepted path, then the first rejected
        props = torch.where(pick >= 0, ids_v.gather(1, pick.clamp_min(0)), -1)  # -1: the pruned tree had none there
        # the accepted path's KV (and captured states) move from their tree slots to consecutive positions
        rows = ar[:, None]
        src, dst = (n[:, None] + path).clamp_max(self.max_len - 1), (n[:, None] + 1 + steps).clamp_max(self.max_len - 1)
        for store in (self.tcache.k, self.tcache.v):
            store[:, rows, dst] = store[:, rows, src]
        if self.capture:
            for store in (self.aux_store, self.hid_store) + ((self.tok_store,) if self.lazy_draft else ()):
                store[rows, dst] = store[rows, src]
        aux_path = aux.gather(1, torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), path], 1)[..., None]
                              .expand(B, K + 1, aux.shape[-1]))
        self._commit(B, tokens, aux_path, n_acc, props)

    def _tp(self, top_p):
        return top_p if self._filter else None

    def depths(self) -> list[int]:
        """The round depths this runner can run: any chain depth 0..lookahead; a tree only its full depth."""
        if self.draft is None:
            return [0]
        return [0, self.k] if self.topk > 1 else list(range(self.k + 1))

    def bucket(self, B: int) -> int:
        return _bucket(B, self.batch_sizes)

    @torch.inference_mode()
    def round(self, B: int, max_cached: int, filtering: bool, greedy_only: bool, depth: int | None = None):
        """Run one decoding round of `depth` (default: the full lookahead; 0 = plain decoding) for rows 0..B-1.
        max_cached: longest committed length among them. Returns host copies (tokens [B,d+1], n_acc [B],
        proposals [B,d]). `captured` tells whether this call captured a CUDA graph, `caught_up` whether it first
        extended a lagging draft (either way its time is not the depth's)."""
        d = (self.k if self.draft is not None else 0) if depth is None else depth
        if d not in self.depths():
            raise ValueError(f"depth {d} not in {self.depths()}")
        Bp = _bucket(B, self.batch_sizes)
        self._keys = _bucket(max_cached + self.span, self.key_sizes)
        self._filter = filtering
        self._greedy_only = greedy_only
        fn = self._round_fn(d)
        self.captured = False
        # the first speculative round after plain ones also extends the draft over what those skipped: a cost of
        # switching, not of the depth (timed with the round, it made the first depth probed look several times
        # dearer than the next, and deeper depths extrapolated from those two look no dearer than the second)
        self.caught_up = d > 0 and self.lazy_draft and any(self.lag[:B])
        if self.caught_up:
            self._catch_up(B)
        if self.use_graphs:
            key = (Bp, self._keys, filtering, greedy_only, d)
            if key not in self.graphs:
                self.graphs[key] = self._capture(fn, Bp)
                self.captured = True
            self.graphs[key].replay()
        else:
            fn(Bp)
        out = torch.cat([self.out_tokens[:B, :d + 1], self.out_n[:B, None], self.out_props[:B, :d]], 1).cpu()
        if d == 0 and self.lazy_draft:
            for r in range(B):
                self.lag[r] += 1
        return out[:, :d + 1], out[:, d + 1], out[:, d + 2:]

    def _capture(self, fn, Bp: int):
        # the warm-up run advances row state; restore it. Its KV and capture writes land beyond every
        # row's committed length, where they are masked out and overwritten, so they need no restore.
        state = [self.cache_len, self.next_tok] + ([self.d_hidden, self.d_len] if self.draft is not None else [])
        saved = [t.clone() for t in state]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(Bp)
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(state, saved):
            t.copy_(v)
        g = torch.cuda.CUDAGraph()
        # capture_begin/end rather than torch.cuda.graph(), which also synchronises the device, runs gc.collect()
        # and empties the cache: with a trainer busy on the same GPU that made each capture mid-serving a stall.
        # thread_local: the trainer thread keeps launching kernels on its own stream during a capture.
        with torch.cuda.stream(s):
            g.capture_begin(*(() if self.graph_pool is None else (self.graph_pool,)), capture_error_mode="thread_local")
            try:
                fn(Bp)
            finally:
                g.capture_end()
        torch.cuda.current_stream().wait_stream(s)
        self.graph_pool = g.pool()
        return g

    def capture_all(self, depths: list[int], filtering: bool = False, greedy_only: bool = True) -> int:
        """Capture the round of every (batch bucket, key bucket) at each of `depths`, and the prefill of every
        (rows, length) bucket, now, so that serving never captures one mid-traffic when the depth decision, a growing
        context or an admission group reaches a new shape. Returns the count."""
        if not self.use_graphs:
            return 0
        n = 0
        with torch.inference_mode():
            for d in depths:
                fn = self._round_fn(d)
                for Bp in self.batch_sizes:
                    for keys in self.key_sizes:
                        key = (Bp, keys, filtering, greedy_only, d)
                        if key in self.graphs:
                            continue
                        self._keys, self._filter, self._greedy_only = keys, filtering, greedy_only
                        self.graphs[key] = self._capture(fn, Bp)
                        n += 1
            if self.staged_prefill:
                try:
                    n += self._capture_prefills(greedy_only)
                except RuntimeError as e:  # serving still works, on the eager prefill: say so, once, at start
                    log.warning("prefill CUDA graphs could not be captured (%s); prefills run eagerly", e)
                    self.staged_prefill = False
        torch.cuda.synchronize()
        return n

    def _capture_prefills(self, greedy_only: bool) -> int:
        """Staging rows only: pf_dst points every staging row at itself until a real prefill."""
        return sum(self._prefill_graph(Bb, Pb, greedy_only, False, drafted)[1]
                   for drafted in ([False, True] if self.draft is not None else [False])
                   for Bb in self.prefill_batch for Pb in self.prefill_lens)

    def _round_fn(self, d: int):
        if d == 0:
            return self._decode_round
        if self.topk > 1:
            return self._tree_round
        return lambda b: self._spec_round(b, d)

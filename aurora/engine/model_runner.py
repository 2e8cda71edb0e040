"""Everything on the device: target and draft weights, their slot KV caches, per-row decoding state, and
the speculative round — draft chain, one target verify forward, acceptance, draft extend — as one
function of static shapes. On CUDA each (batch bucket, key-length bucket) of it is captured once as a
CUDA graph: a round is then one replay plus one small device-to-host copy.

Row state lives on the device, indexed by batch row (= KV slot):
  cache_len [S]  tokens committed to both KV caches (n)     next_tok [S]  x[n], sampled but not yet fed
  d_hidden [S,H] draft pre-norm hidden at position n-1     d_logits [S,Vd] draft logits there (predict x[n+1])
Capture stores (aux [S,L,3H], hid [S,L,H]) are written at the same positions as the target's KV.
"""
import math

import torch

from aurora.engine.kv_cache import SlotKVCache, block_mask
from aurora.engine.sampling import probs, sample, uniform, verify_chain, verify_greedy
from aurora.models.draft import Eagle3Draft
from aurora.models.target import TargetModel


def _bucket(n: int, sizes: list[int]) -> int:
    for s in sizes:
        if s >= n:
            return s
    return sizes[-1]


class ModelRunner:
    def __init__(self, target: TargetModel, draft: Eagle3Draft | None, max_batch: int, max_len: int,
                 lookahead: int, capture: bool, cuda_graphs: bool):
        self.target, self.draft, self.k = target, draft, lookahead
        self.device = dev = target.embed_tokens.weight.device
        self.dtype = dt = target.embed_tokens.weight.dtype
        self.max_len, self.max_batch = max_len, max_batch
        c = target.config
        S = max_batch
        self.batch_sizes = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128) if b < S} | {S})
        self.key_sizes = sorted({min(max_len, 128 * 2 ** i) for i in range(int(math.log2(max(max_len // 128, 1))) + 2)})
        self.tcache = SlotKVCache(c.num_hidden_layers, S, max_len, c.num_key_value_heads, target.head_dim, dt, dev)
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
            self.aux_store = torch.zeros(S, max_len, 3 * H, dtype=dt, device=dev)
            self.hid_store = torch.zeros(S, max_len, H, dtype=dt, device=dev)
        if draft is not None:
            dc = draft.config
            self.dcache = SlotKVCache(1, S, max_len, dc.num_key_value_heads, dc.head_dim, dt, dev)
            self.d_hidden = torch.zeros(S, dc.hidden_size, dtype=dt, device=dev)
            self.d_logits = torch.zeros(S, dc.draft_vocab_size, dtype=dt, device=dev)
        self.use_graphs = cuda_graphs and dev.type == "cuda"
        self.graphs: dict = {}
        self.graph_pool = None
        self.out_tokens = torch.zeros(S, lookahead + 1, dtype=torch.long, device=dev)
        self.out_n = torch.zeros(S, dtype=torch.long, device=dev)
        self.out_props = torch.zeros(S, lookahead, dtype=torch.long, device=dev)

    # ---------------------------------------------------------------- rows
    def set_row(self, row: int, temp: float, top_p: float, top_k: int, seed: int) -> None:
        self.temp[row], self.top_p[row], self.top_k[row], self.seed[row] = temp, top_p, top_k, seed

    def move_row(self, src: int, dst: int) -> None:
        self.tcache.move(src, dst)
        tensors = [self.cache_len, self.next_tok, self.active, self.temp, self.top_p, self.top_k, self.seed]
        if self.capture:
            tensors += [self.aux_store, self.hid_store]
        if self.draft is not None:
            self.dcache.move(src, dst)
            tensors += [self.d_hidden, self.d_logits]
        for t in tensors:
            t[dst] = t[src]
        self.active[src] = False

    def release_row(self, row: int) -> None:
        self.active[row] = False
        self.cache_len[row] = 0

    def read_capture(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aux_store[row, :n].cpu(), self.hid_store[row, :n].cpu()

    # ---------------------------------------------------------------- forwards
    def _target(self, ids, n, tree, row0=0):
        """ids [B,T] at positions n..n+T-1 (n [B]) -> (hidden, aux); writes KV and capture stores."""
        B, T = ids.shape
        pos = n[:, None] + torch.arange(T, device=ids.device)
        wpos = pos.clamp_max(self.max_len - 1)
        S = self._keys
        h, aux = self.target(ids, pos, self.tcache.attend(row0, wpos, block_mask(n, tree, S)))
        if self.capture:
            rows = torch.arange(row0, row0 + B, device=ids.device)[:, None]
            self.aux_store[rows, wpos] = aux
            self.hid_store[rows, wpos] = h
        return h, aux

    def _draft(self, ids, g, n, tree, row0=0):
        B, T = ids.shape
        pos = n[:, None] + torch.arange(T, device=ids.device)
        wpos = pos.clamp_max(self.max_len - 1)
        return self.draft(ids, g, pos, self.dcache.attend(row0, wpos, block_mask(n, tree, self._keys)))

    def _q(self, d_logits, temp, top_p, top_k):
        """Draft logits [B,Vd] -> draft probabilities over the target vocabulary [B,V]."""
        q_d = probs(d_logits[:, None], temp, top_p, top_k)[:, 0]
        V = self.target.config.vocab_size
        ids = torch.arange(q_d.shape[-1], device=q_d.device) + self.draft.d2t
        return torch.zeros(q_d.shape[0], V, device=q_d.device).index_copy_(1, ids, q_d)

    @torch.inference_mode()
    def prefill(self, row: int, prompt: list[int]) -> int:
        """Fill row's caches with the prompt, sample x[P]; returns it (one sync, at admission only)."""
        P = len(prompt)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        n0 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._keys = _bucket(P + 1, self.key_sizes)
        tree = torch.ones(1, P, P, dtype=torch.bool, device=self.device).tril_()
        h, aux = self._target(ids, n0, tree, row0=row)
        r = slice(row, row + 1)
        logits = self.target.logits(h[:, -1])
        p = probs(logits[:, None], self.temp[r], self.top_p[r], self.top_k[r])[:, 0]
        pos = torch.full((1,), P - 1, dtype=torch.long, device=self.device)
        tok = torch.where(self.temp[r] > 0, sample(p, uniform(self.seed[r], pos, 3, p.shape[-1])), logits.argmax(-1))
        if self.draft is not None:  # draft position t reads x[t+1]: ids shifted by one, the new token last
            d_ids = torch.cat([ids[:, 1:], tok[:, None]], dim=1)
            dh, dl = self._draft(d_ids, self.draft.project(aux), n0, tree, row0=row)
            self.d_hidden[row], self.d_logits[row] = dh[0, -1], dl[0, -1]
        self.cache_len[row], self.next_tok[row], self.active[row] = P, tok[0], True
        return int(tok[0])

    def _decode_round(self, B: int):
        """Target-only: feed x[n], sample x[n+1]."""
        n, x = self.cache_len[:B], self.next_tok[:B]
        tree = torch.ones(B, 1, 1, dtype=torch.bool, device=self.device)
        h, _ = self._target(x[:, None], n, tree)
        logits = self.target.logits(h[:, 0])
        temp, top_p, top_k = self.temp[:B], self.top_p[:B], self.top_k[:B]
        tok = logits.argmax(-1)
        if not self._greedy_only:
            p = probs(logits[:, None], temp, self._tp(top_p), top_k)[:, 0]
            tok = torch.where(temp > 0, sample(p, uniform(self.seed[:B], n, 3, p.shape[-1])), tok)
        self.out_tokens[:B, 0] = tok
        self.out_n[:B] = 0
        self.next_tok[:B] = tok
        self.cache_len[:B] += self.active[:B].long()

    def _spec_round(self, B: int):
        k, dev = self.k, self.device
        n, x = self.cache_len[:B], self.next_tok[:B]
        temp, top_p, top_k, seed = self.temp[:B], self.top_p[:B], self.top_k[:B], self.seed[:B]
        greedy = temp <= 0
        one = torch.ones(B, 1, 1, dtype=torch.bool, device=dev)
        # 1. draft chain: d1 from the extend output at n-1; step j runs at position n+j-1 on d_j
        h, logits = self.d_hidden[:B], self.d_logits[:B]
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
        # 3. draft extend over the verified positions n..n+n_acc (later rows are masked garbage, overwritten)
        dh, dl = self._draft(tokens, self.draft.project(aux), n, chain)
        ar = torch.arange(B, device=dev)
        self.d_hidden[:B] = dh[ar, n_acc]
        self.d_logits[:B] = dl[ar, n_acc]
        self.next_tok[:B] = tokens[ar, n_acc]
        self.cache_len[:B] += (n_acc + 1) * self.active[:B].long()
        self.out_tokens[:B] = tokens
        self.out_n[:B] = n_acc
        self.out_props[:B] = drafts

    def _tp(self, top_p):
        return top_p if self._filter else None

    @torch.inference_mode()
    def round(self, B: int, max_cached: int, filtering: bool, greedy_only: bool):
        """Run one decoding round for rows 0..B-1. max_cached: longest committed length among them.
        Returns host copies (tokens [B,k+1], n_acc [B], proposals [B,k])."""
        Bp = _bucket(B, self.batch_sizes)
        self._keys = _bucket(max_cached + self.k + 1, self.key_sizes)
        self._filter = filtering
        self._greedy_only = greedy_only
        fn = self._spec_round if self.draft is not None else self._decode_round
        if self.use_graphs:
            key = (Bp, self._keys, filtering, greedy_only)
            if key not in self.graphs:
                self.graphs[key] = self._capture(fn, Bp)
            self.graphs[key].replay()
        else:
            fn(Bp)
        out = torch.cat([self.out_tokens[:B], self.out_n[:B, None], self.out_props[:B]], 1).cpu()
        k1 = self.k + 1
        return out[:, :k1], out[:, k1], out[:, k1 + 1:]

    def _capture(self, fn, Bp: int):
        # the warm-up run advances row state; restore it. Its KV and capture writes land beyond every
        # row's committed length, where they are masked out and overwritten, so they need no restore.
        state = [self.cache_len, self.next_tok] + ([self.d_hidden, self.d_logits] if self.draft is not None else [])
        saved = [t.clone() for t in state]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(Bp)
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(state, saved):
            t.copy_(v)
        g = torch.cuda.CUDAGraph()
        # thread_local: the trainer thread keeps launching kernels on its own stream during a capture
        with torch.cuda.graph(g, pool=self.graph_pool, capture_error_mode="thread_local"):
            fn(Bp)
        self.graph_pool = g.pool()
        return g

"""Token selection and lossless verification, batched on the device with no host syncs.

Randomness comes from a counter-based hash of (request seed, position, stream), not a global generator:
a request's samples are reproducible whatever it is batched with, and everything stays capturable in a
CUDA graph. Verification follows gpt-fast / SGLang: greedy accepts while the draft equals the target's
argmax; sampling accepts draft token x with probability min(1, p(x)/q(x)), on the first rejection
resamples from normalize(max(p - q, 0)), and adds a bonus token from p when every draft is accepted.
"""
import torch

_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M3 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:  # logical shift right on int64
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform(seed: torch.Tensor, counter: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """[B] seeds, [B] counters -> [B, n] float32 uniforms in (0, 1), splitmix64 of (seed, counter, stream, i)."""
    i = torch.arange(n, device=seed.device, dtype=torch.long)
    x = seed[:, None] * _M1 + counter[:, None] * _M2 + (stream * 1_000_003 + i)[None, :] * _M3
    x = (x ^ _shr(x, 30)) * _M2
    x = (x ^ _shr(x, 27)) * _M3
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def probs(logits: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor | None, top_k: torch.Tensor | None):
    """logits [B,N,V], per-row temp/top_p/top_k [B] -> probabilities [B,N,V] (fp32). Greedy rows (temp 0)
    get temperature 1 here; callers take the argmax for them."""
    t = torch.where(temp > 0, temp, torch.ones_like(temp))[:, None, None]
    x = logits.float() / t
    if top_p is not None:  # top-k and top-p by one sort
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        ranks = torch.arange(x.shape[-1], device=x.device)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, x.shape[-1]))[:, None, None]
        p = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(p, dim=-1) - p  # mass strictly above this token
        # the most likely token always stays: a top_p below float32's smallest value reads 0 here and would
        # otherwise empty the distribution (all -inf: NaN probabilities)
        drop = (ranks >= k) | ((before >= top_p[:, None, None]) & (ranks > 0))
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, idx, sorted_x)
    return torch.softmax(x, dim=-1)


def sample(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p [B,V] probabilities, u [B,V] uniforms -> [B] ids; exponential race = exact categorical sampling."""
    return torch.argmax(p / (-torch.log(u)), dim=-1)


def verify_chain(target_logits, draft_tokens, q_draft, greedy, temp, top_p, top_k, seed, position):
    """Verify k chain drafts in one go.

    target_logits [B,k+1,V]; draft_tokens [B,k] target ids; q_draft [B,k,V] draft probabilities the drafts
    were sampled from (over the target vocabulary); greedy [B] bool; position [B] counter base.
    Returns (tokens [B,k+1]: accepted drafts then the correction/bonus token at index n_acc, n_acc [B]).
    """
    B, K1, V = target_logits.shape
    k = K1 - 1
    ar = torch.arange(B, device=target_logits.device)
    g_tokens, g_acc = verify_greedy(target_logits, draft_tokens)
    # sampling rows: accept x with probability min(1, p(x)/q(x))
    p = probs(target_logits, temp, top_p, top_k)  # [B,k+1,V]
    px = p[:, :k].gather(2, draft_tokens[..., None])[..., 0]
    qx = q_draft.gather(2, draft_tokens[..., None])[..., 0]
    u = uniform(seed, position, 1, k)
    ok = u * qx <= px  # u < min(1, p/q) without dividing by a zero q
    s_acc = torch.cumprod(ok.long(), dim=1).sum(1)
    # token at s_acc: correction from normalize(max(p - q, 0)) if rejected, else bonus from p
    q_pad = torch.cat([q_draft, torch.zeros_like(q_draft[:, :1])], dim=1)  # bonus position has q = 0
    resid = (p[ar, s_acc] - q_pad[ar, s_acc]).clamp_min(0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[ar, s_acc])
    s_tokens = torch.cat([draft_tokens, draft_tokens[:, :1]], dim=1)
    s_tokens[ar, s_acc] = sample(resid, uniform(seed, position, 2, V))
    return torch.where(greedy[:, None], g_tokens, s_tokens), torch.where(greedy, g_acc, s_acc)


def pick(logits, temp, top_p, top_k, seed, counter, greedy_only: bool) -> torch.Tensor:
    """logits [B,V] -> [B] tokens: the argmax for greedy rows, a sample from the filtered distribution for the
    others. greedy_only (known on the host) skips the probability work altogether."""
    tok = logits.argmax(-1)
    if greedy_only:
        return tok
    p = probs(logits[:, None], temp, top_p, top_k)[:, 0]
    return torch.where(temp > 0, sample(p, uniform(seed, counter, 3, p.shape[-1])), tok)


def verify_greedy(target_logits, draft_tokens):
    """All rows greedy: accept drafts while they equal the target's argmax; then the target's token."""
    top = target_logits.argmax(-1)  # [B,k+1]
    k = draft_tokens.shape[1]
    n_acc = torch.cumprod((top[:, :k] == draft_tokens).long(), dim=1).sum(1)
    tokens = torch.cat([draft_tokens, draft_tokens[:, :1]], dim=1)
    ar = torch.arange(top.shape[0], device=top.device)
    tokens[ar, n_acc] = top[ar, n_acc]
    return tokens, n_acc

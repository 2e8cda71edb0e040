"""Greedy-equality helpers shared by the lossless tests: run requests to completion, and the 50-prompt,
two-domain SmolLM2 set (25 chat, 25 code) every speculative configuration is compared on."""
from aurora.prompts import load_prompts


def run_all(engine, prompts, params):
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs], seqs


def chat_ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


def two_domain_prompts(tok):
    return [chat_ids(tok, p) for p in load_prompts("chat", 25)] + \
           [tok(p)["input_ids"][-200:] for p in load_prompts("code", 25)]

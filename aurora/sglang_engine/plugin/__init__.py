"""Imported inside SGLang's scheduler processes through SGLANG_EXTERNAL_MODEL_PACKAGE=aurora.sglang_engine.plugin.

eagle3.py registers `LlamaForCausalLMEagle3` (SGLang's own EAGLE3 draft class, subclassed) so that building the
draft installs Aurora's capture hooks in that process; step_swap.py applies published weights between steps;
depth.py is Aurora's depth decision over SGLang's adaptive states; plain_round.py runs a depth-0 round as the
target's own decode step (decode graphs of its own) instead of SGLang's one-token verify; loader.py is the
draft-only weight loader named by --custom-weight-loader; verify_attention.py turns on SGLang's split-KV verify
attention for a topk-1 draft on the triton backend. No SGLang source file is changed.
"""

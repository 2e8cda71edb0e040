"""Aurora: serve a target LLM with an EAGLE3 draft head and train the draft online from the traffic it serves.

Data flows one way: request -> engine -> sample -> buffer -> trainer -> draft weights -> engine.
  aurora/models    target and draft networks, checkpoints, vocabulary map (torch only)
  aurora/engine    built-in speculative decoding engine (scheduler, KV caches, verification)
  aurora/training  capture buffer, TTT trainer, hot-swap publisher
  aurora/server    OpenAI-compatible HTTP service, metrics, CLI wiring
"""
__version__ = "0.1.0"

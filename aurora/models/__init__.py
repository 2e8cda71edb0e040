"""Networks and their files: the target (Llama family, KV cache by slot), the EAGLE3 draft head, checkpoints."""

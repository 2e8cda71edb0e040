"""Built-in speculative decoding engine: sequences, scheduler, slot KV caches, drafting and lossless verification."""

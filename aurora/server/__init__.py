"""OpenAI-compatible HTTP service, Prometheus metrics, wandb/JSONL logging and run reports."""

"""Shared fixtures: the embedded SmolLM2 target (converted once per machine) and tiny random models."""
import os

os.environ.setdefault("WANDB_MODE", "disabled")
if not os.path.exists("/dev/nvidia0"):
    # Triton kernels run in its interpreter on CPU-only machines; this must precede every triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir():
    from aurora.models.hub import embedded_smollm2

    return embedded_smollm2()


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """A 4-layer random Llama with a 96-token vocabulary, saved as a HF directory with a char tokenizer."""
    from tests.tiny import make_tiny_target

    return make_tiny_target(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)

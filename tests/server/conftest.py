"""Fixtures of the server tests: the real SmolLM2 tokenizer, a fake service, a live server over it."""
import os

os.environ["WANDB_MODE"] = "disabled"

import pytest

from aurora.server.app import create_app
from server_fakes import live_server, make_service, test_config


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from aurora.models.hub import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2"))


@pytest.fixture
def service(tokenizer):
    return make_service(tokenizer)


@pytest.fixture
def server(service):
    """(base_url, service) of a live server over the fake service, with an admin key and no API key."""
    with live_server(create_app(service, test_config(admin_key="admin-secret"))) as url:
        yield url, service

"""Shared fixtures: tiny models built from config (same tokenizer as the default model)."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from instrugo.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir():
    from instrugo.models import resolve_model

    return resolve_model("tiny")

import pytest
import torch

import remoe

TINY_DIMS = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=1,
    initializer_range=0.05,
)


def tiny_config(**overrides) -> remoe.ReMoEConfig:
    values = dict(TINY_DIMS)
    values.update(overrides)
    return remoe.ReMoEConfig(**values)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _shared_corpus_cache(monkeypatch, tmp_path_factory):
    """One embedded-corpus cache for the whole session (tests that need their own set REMOE_CACHE themselves)."""
    monkeypatch.setenv("REMOE_CACHE", str(tmp_path_factory.getbasetemp() / "remoe-cache"))

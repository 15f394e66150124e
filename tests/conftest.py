import json
import random
from pathlib import Path

import pytest
import torch

import remoe

# A toy Llama-family architecture (the dense source models of the conversion tests share it).
TINY_ARCH = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TINY_DIMS = dict(
    vocab_size=97,
    **TINY_ARCH,
    num_experts=4,
    num_experts_per_tok=1,
    initializer_range=0.05,
)

# The `model` section of the small run configs the CLI tests write (TINY_DIMS' architecture; the vocabulary comes from
# the tokenizer).
SMALL_MODEL = {name: TINY_DIMS[name] for name in TINY_DIMS if name not in ("vocab_size", "initializer_range")}
# Words of the toy corpora the CLI and distributed tests generate.
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
]


def tiny_config(**overrides) -> remoe.ReMoEConfig:
    values = dict(TINY_DIMS)
    values.update(overrides)
    return remoe.ReMoEConfig(**values)


def save_tiny_checkpoint(folder, texts: list[str], vocab_size: int, **overrides):
    """A toy ReMoE model (tiny_config) with a BPE tokenizer trained on `texts`, saved together in `folder`; returns
    the tokenizer."""
    from remoe.training.data import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    remoe.ReMoEForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _glibc_defaults_in_the_test_process(monkeypatch):
    """`remoe train` keeps freed memory (`remoe.training.allocator`); the many in-process runs of the suite keep glibc's
    defaults instead, so one test's heap does not stay with the next ones. tests/test_allocator.py tests the setting."""
    monkeypatch.setenv("REMOE_KEEP_FREED_MEMORY", "0")


@pytest.fixture(autouse=True)
def _shared_corpus_cache(monkeypatch, tmp_path_factory):
    """One embedded-corpus cache for the whole session (tests that need their own set REMOE_CACHE themselves)."""
    monkeypatch.setenv("REMOE_CACHE", str(tmp_path_factory.getbasetemp() / "remoe-cache"))


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (empty when the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def fails_with_one_line(capsys, argv: list, message: str, unchanged: Path | None = None) -> str:
    """Run `remoe ARGV`; it must exit with 2 and one error line containing `message`, leaving `unchanged` (a folder)
    as it was. Returns the line."""
    import remoe_cli

    before = folder_snapshot(unchanged) if unchanged is not None else None
    capsys.readouterr()
    assert remoe_cli.main([str(arg) for arg in argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("remoe")]
    assert len(errors) == 1, errors
    assert message in errors[0], errors[0]
    if unchanged is not None:
        assert folder_snapshot(unchanged) == before
    return errors[0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend. Used by a module as
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_word_documents(path: Path, count: int) -> Path:
    """A JSONL file of `count` documents of 20-60 random `WORDS` each (seed 0)."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(count)]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def randomize_experts(experts):
    """Fill a `ReMoEExperts` module's weights with seeded random values scaled by 1/sqrt(fan-in); returns it."""
    generator = torch.Generator().manual_seed(1)
    hidden, intermediate = experts.down_proj.shape[1:]
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) / hidden**0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) / intermediate**0.5)
    return experts

"""Bad input to the conversion, BTX, generation, evaluation and push commands (`remoe.training.cli.main`): exit status
2, one line naming the flag, before any work (nothing written to the output folder)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from remoe import conversion
from remoe.training.cli import main
from remoe.training.data import train_tokenizer

from .conftest import TINY_ARCH, WORDS, fails_with_one_line, save_tiny_checkpoint

GiB = 2**30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """`data.jsonl` (one domain, 'data'), a tiny Llama seed with a tokenizer (`seed/`) and the dense ReMoE it converts
    to (`dense-remoe/`), and a tiny ReMoE MoE checkpoint (`remoe/`); 64 positions each."""
    root = tmp_path_factory.mktemp("bad-cli")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(120)]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    LlamaForCausalLM(LlamaConfig(**TINY_ARCH, vocab_size=len(tokenizer), **special)).save_pretrained(root / "seed")
    tokenizer.save_pretrained(root / "seed")
    save_tiny_checkpoint(root / "remoe", texts, vocab_size=300)
    conversion.to_dense_remoe(root / "seed", root / "dense-remoe")
    return root


def _nothing_written(folder: Path) -> None:
    """Neither `folder` nor a conversion's temporary folder next to it exists."""
    assert not folder.exists()
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))


@contextlib.contextmanager
def _address_space_headroom(extra_bytes: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus `extra_bytes` (Linux), so that a check that failed
    to stop a huge allocation fails the test instead of exhausting the machine."""
    resource = pytest.importorskip("resource")
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS caps the address space on Linux only")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _available_memory(monkeypatch, available: int) -> None:
    real = psutil.virtual_memory

    def virtual_memory():
        return SimpleNamespace(**{**real()._asdict(), "available": available})

    monkeypatch.setattr(psutil, "virtual_memory", virtual_memory)


# ---- the size of a conversion's result ------------------------------------------------------------------------------


def test_upcycle_into_more_experts_than_memory_holds_is_refused_before_any_allocation(workspace, tmp_path, capsys):
    """10^8 copies of a 32x64 FFN: terabytes per layer. Refused from the meta-device shapes alone."""
    out = tmp_path / "upcycled"
    argv = ["upcycle", workspace / "seed", "--num_experts", "100000000", "--output_dir", out]
    with _address_space_headroom(4 * GiB):
        line = fails_with_one_line(capsys, argv, "num_experts (--num_experts) 100000000", workspace / "seed")
    assert "B parameters" in line and "GiB of memory" in line and "GiB available" in line
    _nothing_written(out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["upcycle", "{seed}", "--num_experts", "64", "--granularity", "2"], "granularity (--granularity) 2"),
        (["btx", "mix", "{seed}", "{seed}", "{seed}", "--split", "2"], "3 experts, split (--split) 2"),
        (["convert", "{seed}"], "the converted model (to dense ReMoE) would have"),
    ],
)
def test_results_larger_than_the_available_memory(workspace, tmp_path, capsys, monkeypatch, argv, message):
    _available_memory(monkeypatch, 4096)
    out = tmp_path / "out"
    argv = [str(arg).format(seed=workspace / "seed") for arg in argv] + ["--output_dir", out]
    line = fails_with_one_line(capsys, argv, message, workspace / "seed")
    assert "GiB of memory, this machine has 0.0 GiB available" in line
    _nothing_written(out)


def test_a_result_larger_than_the_free_disk_space(workspace, tmp_path, capsys, monkeypatch):
    from remoe.conversion import writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: SimpleNamespace(total=0, used=0, free=1000))
    out = tmp_path / "out"
    argv = ["upcycle", workspace / "seed", "--num_experts", "8", "--output_dir", out]
    line = fails_with_one_line(capsys, argv, "num_experts (--num_experts) 8", workspace / "seed")
    assert "GiB of free disk space" in line
    _nothing_written(out)


@pytest.mark.parametrize("size", ["lots", "0", "-5", "0.1"])
@pytest.mark.parametrize("command", ["upcycle", "convert", "btx mix"])
def test_max_shard_size_of_conversions(workspace, tmp_path, capsys, command, size):
    seed = workspace / "seed"
    sources = {"upcycle": ["upcycle", seed, "--num_experts", "2"], "convert": ["convert", seed]}
    argv = sources.get(command, ["btx", "mix", seed, seed])
    out = tmp_path / "out"
    fails_with_one_line(capsys, [*argv, "--output_dir", out, "--max_shard_size", size], "--max_shard_size", seed)
    _nothing_written(out)


# ---- router std, float flags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
@pytest.mark.parametrize("command", ["upcycle", "btx mix"])
def test_router_std_must_be_a_finite_positive_number(workspace, tmp_path, capsys, command, value):
    seed = workspace / "seed"
    argv = ["upcycle", seed, "--num_experts", "2"] if command == "upcycle" else ["btx", "mix", seed, seed]
    out = tmp_path / "out"
    fails_with_one_line(capsys, [*argv, "--output_dir", out, f"--router_std={value}"], "--router_std", seed)
    _nothing_written(out)


@pytest.mark.parametrize("value", [math.nan, -1.0, 0.0, math.inf, "0.1"])
def test_router_std_in_python(workspace, tmp_path, value):
    seed = workspace / "seed"
    with pytest.raises(ValueError, match=r"router_std \(--router_std\) must be a finite number > 0"):
        conversion.upcycle(seed, tmp_path / "up", num_experts=2, router_std=value)
    with pytest.raises(ValueError, match=r"router_std \(--router_std\) must be a finite number > 0"):
        conversion.btx_mix([seed, seed], tmp_path / "mix", router_std=value)
    assert not (tmp_path / "up").exists() and not (tmp_path / "mix").exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["upcycle", "{seed}", "--num_experts", "2", "--noise", "nan"], "--noise"),
        (["upcycle", "{seed}", "--num_experts", "2", "--noise", "-0.1"], "--noise"),
        (["upcycle", "{seed}", "--num_experts", "2", "--l1_coef_init", "inf"], "--l1_coef_init"),
        (["upcycle", "{seed}", "--num_experts", "2", "--l1_coef_multiplier", "nan"], "--l1_coef_multiplier"),
        (["btx", "mix", "{seed}", "{seed}", "--router_aux_loss_coef", "inf"], "--router_aux_loss_coef"),
        (["btx", "mix", "{seed}", "{seed}", "--l1_coef_multiplier", "1"], "--l1_coef_multiplier"),
        (["convert", "{seed}", "--l1_coef_init", "-1"], "--l1_coef_init"),
        (["btx", "branch", "{seed}", "--domains", "code", "--learning_rate", "inf"], "--learning_rate"),
        (["btx", "finetune", "{seed}", "--learning_rate", "nan"], "--learning_rate"),
        (["train", "--learning_rate", "inf"], "--learning_rate"),
        (["train", "--router_aux_loss_coef", "nan"], "--router_aux_loss_coef"),
    ],
)
def test_float_flags_refuse_non_finite_values(workspace, tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    argv = [str(arg).format(seed=workspace / "seed") for arg in argv] + ["--output_dir", out]
    fails_with_one_line(capsys, argv, f"argument {flag}: must be a finite number", workspace / "seed")
    assert not out.exists()


# ---- btx mix -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--expert_names", "a", "a"], "expert_names (--expert_names) must be unique"),
        (["--expert_names", "a"], "expert_names (--expert_names) needs one name per source (2)"),
        (["--router_texts", "{data}", "{data}"], "--router_texts choose the texts of the centroid router init"),
        (["--domains", "code", "math"], "--domains choose the texts of the centroid router init"),
        (["--router_init", "centroid", "--domains", "code", "math", "--router_std", "0.1"], "--router_std"),
        (["--router_init", "centroid", "--router_texts", "{data}", "/no/such.txt"], "/no/such.txt"),
    ],
)
def test_mix_options_that_cannot_apply(workspace, tmp_path, capsys, flags, message):
    seed = workspace / "seed"
    out = tmp_path / "out"
    flags = [flag.format(data=workspace / "data.jsonl") for flag in flags]
    fails_with_one_line(capsys, ["btx", "mix", seed, seed, "--output_dir", out, *flags], message, seed)
    _nothing_written(out)


def test_mix_reads_the_centroid_texts_only_after_its_checks(workspace, tmp_path, capsys, monkeypatch):
    """A refused output folder is reported before any router text is read (or any dataset loaded)."""
    from remoe.training import btx

    def fail(*args, **kwargs):
        raise AssertionError("router texts read before the checks")

    monkeypatch.setattr(btx, "read_texts", fail)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    seed, data = workspace / "seed", workspace / "data.jsonl"
    argv = ["btx", "mix", seed, seed, "--router_init", "centroid", "--router_texts", data, data, "--output_dir", out]
    fails_with_one_line(capsys, argv, "exists and is not empty", out)


# ---- btx branch: every job is checked before the seed is converted or any expert trains -----------------------------


@pytest.mark.parametrize("dry_run", [False, True])
def test_branch_checks_every_dataset_before_any_work(workspace, tmp_path, capsys, dry_run):
    out = tmp_path / "branch"
    argv = ["btx", "branch", workspace / "seed", "--output_dir", out, "--max_steps", "2", "--block_size", "16"]
    argv += ["--datasets", workspace / "data.jsonl", "/no/such.jsonl", *(["--dry_run"] if dry_run else [])]
    fails_with_one_line(
        capsys, argv, "--datasets '/no/such.jsonl' (expert 'such'): no such file or directory", workspace
    )
    assert not out.exists()  # the seed was not converted, no expert trained


def test_branch_checks_the_contents_of_every_dataset(workspace, tmp_path, capsys):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    out = tmp_path / "branch"
    argv = ["btx", "branch", workspace / "seed", "--output_dir", out, "--max_steps", "2", "--block_size", "16"]
    fails_with_one_line(capsys, [*argv, "--datasets", workspace / "data.jsonl", bad], "latin.txt:1: not UTF-8 text")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--domains", "code", "poetry"], "--domains ['poetry'] not in the embedded corpus"),
        (["--domains", "code", "--dataset", "{data}"], "--domains ['code'] not in dataset"),
        (
            ["--domains", "code", "--block_size", "128"],
            "data.block_size (128) exceeds the seed's max_position_embeddings",
        ),
        (["--domains", "code", "--tokenizer", "/no/such/tokenizer"], "--tokenizer '/no/such/tokenizer'"),
    ],
)
def test_branch_job_settings_are_checked_before_any_work(workspace, tmp_path, capsys, flags, message):
    out = tmp_path / "branch"
    flags = [flag.format(data=workspace / "data.jsonl") for flag in flags]
    argv = ["btx", "branch", workspace / "seed", "--output_dir", out, "--max_steps", "2", "--block_size", "16"]
    fails_with_one_line(capsys, [*argv, *flags], message, workspace)
    assert not out.exists()


def test_branch_refuses_an_expert_folder_that_holds_a_run(workspace, tmp_path, capsys):
    out = tmp_path / "branch"
    (out / "expert-math").mkdir(parents=True)
    (out / "expert-math" / "metrics.json").write_text("{}")
    argv = ["btx", "branch", workspace / "seed", "--output_dir", out, "--max_steps", "2", "--block_size", "16"]
    fails_with_one_line(capsys, [*argv, "--domains", "code", "math"], "expert 'math'", out)
    assert not (out / "seed").exists()


def test_branch_with_a_remoe_seed_checks_every_job_like_remoe_train(workspace, tmp_path, capsys):
    out = tmp_path / "branch"
    argv = ["btx", "branch", workspace / "dense-remoe", "--output_dir", out, "--max_steps", "2", "--block_size", "16"]
    fails_with_one_line(
        capsys, [*argv, "--datasets", workspace / "data.jsonl", tmp_path / "missing.jsonl", "--dry_run"], "missing"
    )
    assert not out.exists()
    fails_with_one_line(
        capsys, [*argv, "--domains", "code", "--block_size", "128"], "expert 'code': data.block_size (128)"
    )
    assert not out.exists()


# ---- generate ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_new_tokens", "100000"], "--max_new_tokens 100000: the prompt ("),
        (["--max_new_tokens", "0"], "argument --max_new_tokens: must be an integer >= 1"),
        (["--do_sample", "--temperature", "inf"], "argument --temperature: must be a finite number"),
        (["--do_sample", "--temperature", "nan"], "argument --temperature: must be a finite number"),
        (["--do_sample", "--top_p", "nan"], "argument --top_p: must be a finite number"),
        (["--device", "meta"], "--device 'meta': must be one of"),
    ],
)
def test_generate_options(workspace, capsys, flags, message):
    line = fails_with_one_line(
        capsys, ["generate", workspace / "remoe", "--prompt", "alpha", *flags], message, workspace / "remoe"
    )
    if "100000" in flags:
        assert "max_position_embeddings (64); use --max_new_tokens" in line


def test_generate_keeps_prompt_and_new_tokens_within_the_context(workspace, capsys):
    model = workspace / "remoe"
    long_prompt = " ".join(["alpha"] * 100)
    fails_with_one_line(capsys, ["generate", model, "--prompt", long_prompt], "--prompt: the prompt is", model)
    # Without --max_new_tokens the default (64) is capped at what the 64 positions leave after the prompt.
    assert main(["generate", str(model), "--prompt", "alpha beta gamma", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "alpha beta gamma"
    from remoe.training.generate import generate

    with pytest.raises(ValueError, match=r"max_new_tokens \(--max_new_tokens\) must be an integer >= 1"):
        generate(str(model), ["alpha"], max_new_tokens=0, device="cpu")
    with pytest.raises(ValueError, match=r"temperature \(--temperature\) must be a finite number > 0"):
        generate(str(model), ["alpha"], do_sample=True, temperature=math.inf, device="cpu")


# ---- eval ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--include_path", "/no/such"], "--include_path '/no/such': no such folder or file"),
        (["--device", "meta"], "--device 'meta': must be one of"),
        (["--num_fewshot", "100000"], "--num_fewshot 100000: task remoe_"),
    ],
)
def test_eval_options(workspace, tmp_path, capsys, flags, message):
    pytest.importorskip("lm_eval")
    results = tmp_path / "results"
    argv = ["eval", workspace / "remoe", "--limit", "1", "--output_path", results / "eval.json", *flags]
    fails_with_one_line(capsys, argv, message, workspace / "remoe")
    assert not results.exists()


# ---- push ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["lots", "0", "5TS"])
def test_push_checks_max_shard_size_before_writing(workspace, tmp_path, capsys, size):
    out = tmp_path / "repo"
    argv = ["push", workspace / "remoe", "--repo_id", "acme/model", "--dry_run", out, "--max_shard_size", size]
    fails_with_one_line(
        capsys, argv, "max_shard_size (--max_shard_size) must be a number of bytes > 0", workspace / "remoe"
    )
    assert not out.exists()

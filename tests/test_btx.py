"""`remoe btx branch|mix|finetune|eval`, `remoe upcycle`, `remoe convert` on the command line (tiny models, tiny data)."""

import json

import pytest
import remoe_cli
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import remoe
from remoe.training.data import train_tokenizer

TINY_ARCH = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def run_cli(argv: list[str]) -> int:
    """`remoe ARGV` through the real command line."""
    return remoe_cli.main([str(arg) for arg in argv])


def _texts(domain: str, count: int) -> list[str]:
    if domain == "code":
        return [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(count)]
    if domain == "math":
        return [f"Question: what is {i} plus {2 * i + 1}? Answer: {3 * i + 1}." for i in range(count)]
    return [f"The function f{i} multiplies its argument by {i}; see the manual, section {i % 9}." for i in range(count)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A three-domain jsonl dataset, a run config using it, and a Llama seed with a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("btx")
    data = root / "data"
    data.mkdir()
    for split, count in (("train", 240), ("validation", 40)):
        rows = [{"text": t, "domain": d} for d in ("code", "docs", "math") for t in _texts(d, count)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = {
        "model": {},
        "data": {"dataset": str(data), "block_size": 32, "max_eval_blocks": 4},
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 100,
            "disable_tqdm": True,
            "use_cpu": True,
        },
    }
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    tokenizer = train_tokenizer([t for d in ("code", "docs", "math") for t in _texts(d, 240)], vocab_size=300)
    seed = LlamaForCausalLM(
        LlamaConfig(
            **TINY_ARCH,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    seed.save_pretrained(root / "seed")
    tokenizer.save_pretrained(root / "seed")
    return root


@pytest.fixture(autouse=True)
def _cache_and_threads(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("REMOE_CACHE", str(tmp_path_factory.getbasetemp() / "remoe-cache"))
    # These models are tiny: one thread is much faster than two on a busy shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


def test_branch_mix_finetune_eval(workspace, tmp_path, capsys):
    config, branch_dir = workspace / "run.yaml", tmp_path / "branch"
    args = ["btx", "branch", workspace / "seed", "--output_dir", branch_dir, "--config", config]
    assert run_cli([*args, "--domains", "code", "math"]) == 0

    description = json.loads((branch_dir / "btx_branch.json").read_text())
    assert [job["name"] for job in description["experts"]] == ["code", "math"]
    assert "remoe train --config" in (branch_dir / "branch_jobs.sh").read_text()
    seed = tensors(branch_dir / "seed")
    for name in ("code", "math"):
        metrics = json.loads((branch_dir / f"expert-{name}" / "metrics.json").read_text())
        assert metrics["train_steps"] == 2 and metrics["router_type"] == "dense"
        assert set(k for k in metrics if k.endswith("_loss") and k.startswith("validation_")) == {
            "validation_loss",
            f"validation_{name}_loss",
        }
        expert = tensors(branch_dir / f"expert-{name}")
        assert not torch.equal(
            expert["model.layers.0.mlp.gate_proj.weight"], seed["model.layers.0.mlp.gate_proj.weight"]
        )

    # A branch folder stands for its experts and seed; the centroid router reads each expert's domain texts.
    mixed_dir = tmp_path / "mixed"
    mix_args = ["btx", "mix", branch_dir, "--output_dir", mixed_dir, "--seed_as_expert", "--router_init", "centroid"]
    assert run_cli([*mix_args, "--num_experts_per_tok", "1", "--router_max_tokens", "512"]) == 0
    mixed = AutoModelForCausalLM.from_pretrained(mixed_dir)
    assert type(mixed) is remoe.ReMoEForCausalLM and mixed.config.num_experts == 3
    info = json.loads((mixed_dir / "remoe_conversion.json").read_text())
    assert [e["name"] for e in info["experts"]] == ["code", "math", "seed"]
    experts = tensors(branch_dir / "expert-math")
    torch.testing.assert_close(
        mixed.model.layers[1].mlp.experts.down_proj[1], experts["model.layers.1.mlp.down_proj.weight"]
    )

    finetuned_dir = tmp_path / "finetuned"
    finetune = ["btx", "finetune", mixed_dir, "--output_dir", finetuned_dir, "--config", config, "--freeze_experts"]
    assert run_cli(finetune) == 0
    metrics = json.loads((finetuned_dir / "metrics.json").read_text())
    assert metrics["router_type"] == "relu" and "validation_docs_loss" in metrics
    finetuned = AutoModelForCausalLM.from_pretrained(finetuned_dir)
    for layer_before, layer_after in zip(mixed.model.layers, finetuned.model.layers, strict=True):
        assert torch.equal(layer_before.mlp.experts.gate_up_proj, layer_after.mlp.experts.gate_up_proj)
        assert not torch.equal(layer_before.mlp.router.weight, layer_after.mlp.router.weight)
    assert (finetuned_dir / "remoe_conversion.json").is_file()

    capsys.readouterr()
    data = workspace / "data"
    report = tmp_path / "eval.json"
    eval_args = ["btx", "eval", finetuned_dir, branch_dir / "expert-code", "--dataset", data, "--block_size", "32"]
    assert run_cli([*eval_args, "--max_eval_blocks", "4", "--output_json", report]) == 0
    printed = capsys.readouterr().out
    assert "| model | code | docs | math | average |" in printed and "| domain | code | math | seed |" in printed
    results = json.loads(report.read_text())
    shares = results["finetuned"]["routing_shares"]
    for domain in ("code", "docs", "math"):
        assert sum(shares[domain].values()) == pytest.approx(1.0)
    assert results["finetuned"]["losses"]["code"] == pytest.approx(metrics["validation_code_loss"], rel=0.02)
    assert results["expert-code"]["routing_shares"] == {}


def test_branch_dry_run_with_one_dataset_per_expert(workspace, tmp_path):
    data = workspace / "data"
    out = tmp_path / "plan"
    args = ["btx", "branch", workspace / "seed", "--output_dir", out, "--config", workspace / "run.yaml"]
    assert run_cli([*args, "--datasets", data / "train.jsonl", data, "--max_steps", "7", "--dry_run"]) == 0
    description = json.loads((out / "btx_branch.json").read_text())
    assert [job["name"] for job in description["experts"]] == ["train", "data"]
    job = description["experts"][0]
    assert job["job"]["dataset"] == str(data / "train.jsonl") and job["job"]["max_steps"] == 7
    assert "--max_steps 7" in job["command"] and f"--model_name_or_path {out / 'seed'}" in job["command"]
    assert (out / "expert-data" / "btx_job.json").is_file() and not (out / "expert-data" / "metrics.json").exists()


def test_upcycle_and_convert_on_the_command_line(workspace, tmp_path):
    out = tmp_path / "upcycled"
    args = ["upcycle", workspace / "seed", "--output_dir", out, "--num_experts", "4", "--router_type", "topk"]
    assert run_cli([*args, "--num_experts_per_tok", "2", "--noise", "0.01", "--router_aux_loss_coef", "0.02"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.router_type == "topk" and model.config.num_experts == 4
    assert model.config.router_aux_loss_coef == 0.02 and (out / "tokenizer.json").is_file()

    mixtral = MixtralForCausalLM(MixtralConfig(**TINY_ARCH, vocab_size=100, num_local_experts=4))
    mixtral.save_pretrained(tmp_path / "mixtral")
    assert run_cli(["convert", tmp_path / "mixtral", "--output_dir", tmp_path / "relu", "--l1_coef_init", "1e-4"]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "relu")
    assert converted.config.router_type == "relu" and converted.l1_coef == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["btx", "branch", "{seed}", "--domains", "poetry"], "poetry"),
        (["btx", "branch", "{mixtral}", "--domains", "code"], "dense"),
        (["btx", "branch", "{other}", "--domains", "code"], "no tokenizer"),
        (["btx", "branch", "{seed}", "--domains", "code", "--max_steps", "0"], "max_steps"),
        (["btx", "mix", "{seed}", "{other}"], "hidden_size"),
        (["btx", "mix", "{seed}", "{seed}", "--num_experts_per_tok", "3"], "num_experts_per_tok"),
        (["btx", "mix", "{seed}", "{seed}", "--router_init", "centroid"], "router_init"),
        (["btx", "finetune", "{seed}"], "not 'remoe'"),
        (["upcycle", "{mixtral}", "--num_experts", "2"], "MoE"),
        (["convert", "{seed}", "--router_type", "relu"], "upcycle"),
    ],
)
def test_bad_input_fails_before_writing(workspace, tmp_path, capsys, argv, message):
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(**{**TINY_ARCH, "hidden_size": 64}, vocab_size=300)).save_pretrained(other)
    mixtral = tmp_path / "mixtral"
    MixtralForCausalLM(MixtralConfig(**TINY_ARCH, vocab_size=100, num_local_experts=2)).save_pretrained(mixtral)
    paths = {"seed": workspace / "seed", "other": other, "mixtral": mixtral}
    out = tmp_path / "out"
    argv = [arg.format(**paths) for arg in argv] + ["--output_dir", str(out)]
    if argv[1] in ("branch", "finetune"):
        argv += ["--config", str(workspace / "run.yaml")]
    assert run_cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import remoe  # noqa: F401  (registers the Auto classes)
from remoe.training.cli import main

from .conftest import SMALL_MODEL

SMALL_RUN = {
    "model": {**SMALL_MODEL, "router_type": "relu", "l1_coef_init": 1e-4},
    "data": {"dataset": "builtin", "vocab_size": 384, "block_size": 32, "max_eval_blocks": 3},
    "training": {
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 2,
        "save_steps": 3,
        "disable_tqdm": True,
        "use_cpu": True,
    },
}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL_RUN))
    return path


@pytest.mark.parametrize("router_type", ["relu", "topk", "dense"])
def test_train_writes_a_loadable_checkpoint_with_metrics_and_curves(run_config, tmp_path, router_type):
    output = tmp_path / "run"
    assert main(["train", "--config", str(run_config), "--router_type", router_type, "--output_dir", str(output)]) == 0

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["router_type"] == router_type
    for domain in ("code", "docs", "math"):
        assert metrics[f"validation_{domain}_loss"] > 0
        assert metrics[f"validation_{domain}_perplexity"] == pytest.approx(
            torch.tensor(metrics[f"validation_{domain}_loss"]).exp().item(), rel=1e-6
        )
    assert metrics["tokens_per_second"] > 0 and metrics["active_parameters"] <= metrics["total_parameters"]
    if router_type == "relu":
        assert 0 <= metrics["validation_sparsity"] <= 1 and metrics["target_sparsity"] == 0.75
        assert metrics["l1_coef"] > 0
    assert (output / "training_curves.png").stat().st_size > 10_000
    assert list((output / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert {p.name for p in output.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}

    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model.config.router_type == router_type and model.config.vocab_size == len(tokenizer)
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4


def test_resume_continues_from_the_checkpoint_with_the_same_lambda(run_config, tmp_path):
    output = tmp_path / "run"
    assert main(["train", "--config", str(run_config), "--output_dir", str(output), "--max_steps", "6"]) == 0
    full = AutoModelForCausalLM.from_pretrained(output)
    at_3 = AutoModelForCausalLM.from_pretrained(output / "checkpoint-3")

    resumed_output = tmp_path / "resumed"
    resumed_output.mkdir()
    (output / "checkpoint-3").rename(resumed_output / "checkpoint-3")
    args = ["train", "--config", str(run_config), "--output_dir", str(resumed_output), "--resume_from_checkpoint"]
    assert main(args) == 0
    resumed = AutoModelForCausalLM.from_pretrained(resumed_output)
    assert at_3.l1_coef != full.l1_coef
    assert resumed.l1_coef == full.l1_coef
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_experts", "4", "--num_experts_per_tok", "5"], "num_experts_per_tok"),
        (["--granularity", "3"], "granularity"),
        (["--l1_coef_multiplier", "0.9"], "l1_coef_multiplier"),
        (["--block_size", "1"], "block_size"),
        (["--preset", "huge"], "preset"),
        (["--config", "missing.yaml"], "missing.yaml"),
        (["--dataset", "/no/such/file.jsonl"], "file.jsonl"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--vocab_size", "100"], "vocab_size"),
        (["--expert_parallel_size", "0"], "expert_parallel_size"),
        (["--resume_from_checkpoint", "/no/such/checkpoint-7"], "checkpoint-7"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(run_config, tmp_path, capsys, flags, message):
    base = [] if "--preset" in flags or "--config" in flags else ["--config", str(run_config)]
    output = tmp_path / "run"
    assert main(["train", *base, *flags, "--output_dir", str(output)]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_continue_from_a_checkpoint_on_some_domains_with_frozen_experts(run_config, tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--config", str(run_config), "--output_dir", str(base), "--max_steps", "2"]) == 0
    tuned = tmp_path / "tuned"
    args = ["train", "--config", str(run_config), "--model_name_or_path", str(base), "--output_dir", str(tuned)]
    flags = ["--domains", "math", "--freeze_experts", "--max_steps", "2", "--l1_coef_multiplier", "1.5"]
    assert main([*args, *flags, "--l1_coef_init", "0.5"]) == 0

    metrics = json.loads((tuned / "metrics.json").read_text())
    assert "validation_math_loss" in metrics and "validation_code_loss" not in metrics
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tuned)
    assert after.config.l1_coef_multiplier == 1.5
    # lambda restarts from --l1_coef_init (not the checkpoint's), then moves x1.5 or /1.5 on each of the 2 steps
    assert min(abs(after.l1_coef / (0.5 * 1.5**power) - 1) for power in (-2, 0, 2)) < 1e-5
    for name, tensor in after.state_dict().items():
        if ".mlp.experts." in name:
            assert torch.equal(tensor, before[name]), name
    assert not torch.equal(after.state_dict()["lm_head.weight"], before["lm_head.weight"])

    assert main([*args, "--num_experts", "8"]) == 2
    assert "num_experts" in capsys.readouterr().err
    assert main([*args, "--l1_coef_multiplier", "0.9", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "l1_coef_multiplier" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["train", "--config", str(run_config), "--domains", "poetry", "--output_dir", str(tmp_path / "x")]) == 2
    assert "poetry" in capsys.readouterr().err


def test_compare_tabulates_mean_and_spread_over_seeds(run_config, tmp_path):
    output = tmp_path / "compare"
    args = ["compare", "--config", str(run_config), "--router_types", "dense", "relu", "--num_experts", "2", "4"]
    assert main([*args, "--seeds", "0", "1", "--max_steps", "2", "--output_dir", str(output)]) == 0
    summary = json.loads((output / "compare.json").read_text())
    rows = {(row["router_type"], row["num_experts"]): row for row in summary["runs"]}
    assert set(rows) == {("dense", None), ("relu", 2), ("relu", 4)}
    losses = [json.loads((output / f"relu-E4-seed{s}" / "metrics.json").read_text())["validation_loss"] for s in (0, 1)]
    assert rows[("relu", 4)]["validation_loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert rows[("relu", 4)]["validation_loss"]["std"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
    router_parameters = 2 * 2 * 32  # layers x experts x hidden: the only active parameters dense does not have
    assert rows[("relu", 2)]["active_parameters"] - rows[("dense", None)]["active_parameters"] == router_parameters
    for name in ("compare.md", "compare_curves.png", "expert_scaling.png"):
        assert (output / name).stat().st_size > 100

    stamp = (output / "relu-E4-seed0" / "metrics.json").stat().st_mtime
    assert main([*args, "--seeds", "0", "1", "--max_steps", "2", "--output_dir", str(output)]) == 0
    assert (output / "relu-E4-seed0" / "metrics.json").stat().st_mtime == stamp  # finished runs are reused


def test_compare_checks_every_run_and_refuses_stale_ones(run_config, tmp_path, capsys):
    output = tmp_path / "compare"
    base = [
        "compare",
        "--config",
        str(run_config),
        "--router_types",
        "relu",
        "--seeds",
        "0",
        "--output_dir",
        str(output),
    ]
    # E=1 cannot take k=2: found before the E=4 run trains
    assert main([*base, "--num_experts", "4", "1", "--num_experts_per_tok", "2", "--max_steps", "2"]) == 2
    assert "num_experts_per_tok" in capsys.readouterr().err and not (output / "relu-E4-seed0").exists()
    assert main([*base, "--num_experts", "4", "--max_steps", "2"]) == 0
    assert main([*base, "--num_experts", "4", "--max_steps", "3"]) == 2  # the finished run used 2 steps
    assert "training.max_steps: 2 there, 3 asked" in capsys.readouterr().err


def test_compare_table_and_curves_tell_runs_apart():
    from remoe.training.compare import ROUTER_COLORS, _mean_and_spread, _shade

    assert _mean_and_spread({"mean": 3.5, "std": 0.0}, 1) == "3.5000 (n=1)"
    assert _mean_and_spread({"mean": 3.5, "std": 0.01}, 3) == "3.5000 ± 0.0100 (n=3)"
    shades = {_shade(ROUTER_COLORS["relu"], index, 4) for index in range(4)}
    assert len(shades) == 4  # one colour per expert count of a router type
    assert _shade(ROUTER_COLORS["topk"], 3, 4) == _shade(ROUTER_COLORS["topk"], 0, 1)  # the largest E: the base colour

"""The model benchmark runs end to end on a toy size, resident and swapped, and reports every contestant."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import TINY_DIMS

ROOT = Path(__file__).resolve().parents[1]
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.mark.parametrize("swap_models", ["never", "always"])
def test_bench_model_reports_every_contestant(tmp_path, swap_models):
    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump({"model": TINY_DIMS}))
    output = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--presets", str(preset)]
    command += ["--batch_size", "2", "--seq_len", "16", "--decode_tokens", "3", "--repeats", "2"]
    command += ["--calibration_steps", "2", "--vocab_size", "64", "--device", "cpu", "--swap_models", swap_models]
    command += ["--transformers_implementations", "eager", "grouped_mm", "--output", str(output)]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    payload = json.loads(output.read_text())
    rows = {(row["model"], row["experts"]): row for row in payload["results"]}
    expected_models = ("remoe-relu", "remoe-topk", "mixtral", "qwen3-moe")
    assert set(rows) == {(model, experts) for model in expected_models for experts in ("eager", "grouped_mm")}
    for (model, _), row in rows.items():
        assert "error" not in row, row
        assert row["swapped"] is (swap_models == "always")
        for key in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert row[key] > 0
        assert ("experts_per_token" in row) is model.startswith("remoe")
    assert rows[("remoe-topk", "eager")]["experts_per_token"] == 1.0
    assert rows[("remoe-relu", "eager")]["calibration_steps"] in (1, 2)


def test_bench_model_times_the_trainer_optimizer_and_states_the_gemm_limit(tmp_path):
    """The timed optimizer is the one `Trainer` builds by default; `--gemm_limit` adds the machine's matmul rate at the
    experts' shapes as a table row, and every model row its exact training FLOPs, GFLOP/s and fraction of the limit."""
    from transformers import TrainingArguments

    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump({"model": TINY_DIMS}))
    output = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--presets", str(preset)]
    command += ["--batch_size", "2", "--seq_len", "16", "--decode_tokens", "2", "--repeats", "2"]
    command += ["--calibration_steps", "1", "--vocab_size", "64", "--device", "cpu", "--swap_models", "never"]
    command += ["--models", "remoe-relu", "mixtral", "--transformers_implementations", "eager", "grouped_mm"]
    command += ["--gemm_limit", "--keep_freed_memory", "--output", str(output)]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    payload = json.loads(output.read_text())
    assert payload["optimizer"] == TrainingArguments(output_dir=str(tmp_path / "args"), use_cpu=True).optim.value
    assert payload["settings"]["keep_freed_memory"] is True and isinstance(payload["malloc"], dict)
    limit = payload["gemm_limit"][str(preset)]
    tokens_per_expert = 2 * 16 * TINY_DIMS["num_experts_per_tok"] // TINY_DIMS["num_experts"]
    hidden, intermediate = TINY_DIMS["hidden_size"], TINY_DIMS["intermediate_size"]
    assert limit["tokens_per_expert"] == tokens_per_expert and limit["dtype"] == "float32" and limit["gflops"] > 0
    libraries = limit["libraries"]
    assert set(libraries) == {"torch.matmul", *(["onednn"] if ONEDNN else [])}
    assert limit["gflops"] == max(library["gflops"] for library in libraries.values())
    assert libraries[limit["library"]]["gflops"] == limit["gflops"]
    for library in libraries.values():
        shape = library["shapes"]["gate_up_forward"]
        assert (shape["m"], shape["k"], shape["n"]) == (tokens_per_expert, hidden, 2 * intermediate)
        assert len(library["shapes"]) == 6 and all(shape["gflops"] > 0 for shape in library["shapes"].values())
        assert len(library["gflops_per_round"]) == 2 and library["gflops"] == pytest.approx(
            sum(library["gflops_per_round"]) / 2, rel=1e-3
        )  # timed in turns with the models, once per round
    limit_rows = [line.split()[1:3] for line in completed.stdout.splitlines() if line.split()[1:2] == ["gemm:"]]
    assert limit_rows == [["gemm:", library] for library in libraries], completed.stdout

    rows = {(row["model"], row["experts"]): row for row in payload["results"]}
    assert set(rows) == {(model, experts) for model in ("remoe-relu", "mixtral") for experts in ("eager", "grouped_mm")}
    # at least the attention projections and the LM head: 6 FLOPs per weight per token (forward and backward)
    heads = TINY_DIMS["num_attention_heads"]
    head_dim = hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * TINY_DIMS["num_key_value_heads"])
    floor = 6 * 2 * 16 * (TINY_DIMS["num_hidden_layers"] * attention + hidden * 64)
    for model in ("remoe-relu", "mixtral"):
        flops = {rows[(model, experts)]["train_flops_per_step"] for experts in ("eager", "grouped_mm")}
        assert len(flops) == 1 and flops.pop() >= floor  # counted once per model, credited to every implementation
    for row in rows.values():
        assert row["train_gflops"] == pytest.approx(row["train_flops_per_step"] * row["train_tokens_per_s"] / 32 / 1e9)
        assert row["fraction_of_gemm_limit"] == pytest.approx(row["train_gflops"] / limit["gflops"])
        matmul_limit = libraries["torch.matmul"]["gflops"]
        assert row["fraction_of_matmul_limit"] == pytest.approx(row["train_gflops"] / matmul_limit)


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    """`benchmarks/gpu_check.sh --dry_run`: the GPU check's steps on CPU with tiny shapes, each result as JSON."""
    output = tmp_path / "gpu_check"
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry_run", "--output_dir", str(output)]
    environment = {**os.environ, "PYTHON": sys.executable}
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    def load(name: str) -> dict:
        return json.loads((output / name).read_text())

    summary = load("summary.json")
    steps = {step["step"]: step for step in summary["steps"]}
    expected_steps = ("environment", "cuda_tests", "experts_bf16", "experts_autocast", "model_182m", "autotune_tests")
    assert tuple(steps) == expected_steps
    assert summary["ok"] and all(step["exit_status"] == 0 and step["seconds"] > 0 for step in steps.values()), steps
    assert load("environment.json")["dry_run"] is True and load("environment.json")["torch"] == torch.__version__
    for tests in ("cuda_tests.json", "autotune_tests.json"):
        report = load(tests)
        assert report["complete"] and report["tests"] > 0 and report["failures"] == report["errors"] == 0, report

    for name, dtype, autocast in (("bf16", "bfloat16", None), ("autocast", "float32", "bfloat16")):
        report = load(f"bench_experts_{name}.json")
        assert (report["dtype"], report["autocast"]) == (dtype, autocast)
        rows = {row["implementation"]: row for row in report["results"]}
        assert set(rows) == {"triton", "grouped_mm", "eager", "dense"}
        for row in rows.values():
            assert row["error"] is None and row["forward_ms"] > 0 and row["forward_backward_tflops"] > 0, row
        (summary_row,) = report["summaries"].values()
        assert summary_row["speedup_vs_grouped_mm"] > 0 and summary_row["fraction_of_dense_tflops"] > 0

    model = load("bench_model_182m.json")
    assert model["settings"]["autocast"] == "bf16"
    assert {row["experts"] for row in model["results"]} == {"eager", "grouped_mm"}
    assert all(row["train_tokens_per_s"] > 0 for row in model["results"]), model["results"]


def _bench_model_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "benchmarks" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_model_overrides_give_every_contestant_the_same_fine_grained_experts():
    """`--model_overrides granularity=G` gives ReMoE G-way split experts and the Transformers models the same E*G experts
    of width I/G with k*G per token, so the active parameters stay equal; Lory (G=1 only) is left out."""
    import argparse

    bench_model = _bench_model_module()
    parser = argparse.ArgumentParser()
    overrides = bench_model.parse_model_overrides(parser, ["num_experts=4", "granularity=2"])
    assert overrides == {"num_experts": 4, "granularity": 2}
    for bad in (["granularity=0"], ["dropout=1"], ["num_experts=x"]):
        with pytest.raises(SystemExit):
            bench_model.parse_model_overrides(parser, bad)

    dims = {**TINY_DIMS, **overrides}
    builders = bench_model.build_models(dims, vocab_size=64)
    assert "remoe-lory" not in builders
    relu, mixtral, qwen = builders["remoe-relu"](), builders["mixtral"](), builders["qwen3-moe"]()
    remoe_experts = relu.model.layers[0].mlp.experts
    mixtral_experts = mixtral.model.layers[0].mlp.experts
    assert remoe_experts.gate_up_proj.shape == mixtral_experts.gate_up_proj.shape
    assert remoe_experts.gate_up_proj.shape[0] == 4 * 2
    assert mixtral.config.num_experts_per_tok == relu.config.routed_top_k == TINY_DIMS["num_experts_per_tok"] * 2
    assert qwen.config.num_experts == 8 and qwen.config.moe_intermediate_size == TINY_DIMS["intermediate_size"] // 2
    shapes = bench_model.expert_gemm_shapes(dims, tokens=64)
    # 64 tokens x k*G = 2 pairs over E*G = 8 experts: 16 rows per expert, each of width I/G = 32.
    assert shapes["down_forward"] == (16, 32, TINY_DIMS["hidden_size"])


def _run_on_the_toy_preset(tmp_path: Path, script: str, *flags: str) -> dict:
    """Run `benchmarks/<script>` on a toy preset (batch 2 x 16, one calibration step); its JSON output."""
    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump({"model": TINY_DIMS}))
    output = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--preset", str(preset), *flags]
    command += ["--batch_size", "2", "--seq_len", "16", "--calibration_steps", "1", "--vocab_size", "64"]
    completed = subprocess.run(
        [*command, "--output", str(output)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text())


def test_profile_step_splits_the_step_time_and_rates_the_matmuls(tmp_path):
    """`profile_step.py` accounts for all of a step's op time by category and states the matmuls' own FLOP rate
    against the machine's matmul limit."""
    payload = _run_on_the_toy_preset(tmp_path, "profile_step.py", "--steps", "2", "--top_ops", "5")
    shares = {row["category"]: row["share"] for row in payload["categories"]}
    assert set(shares) >= {"matmul", "attention", "optimizer", "loss", "routing and dispatch"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["matmul"] > 0 and shares["optimizer"] > 0 and shares["routing and dispatch"] > 0
    milliseconds = sum(row["ms_per_step"] for row in payload["categories"])
    assert milliseconds == pytest.approx(1e3 * payload["op_seconds_per_step"])
    assert payload["matmul_flops_per_step"] > 0 and payload["gemm_limit"]["gflops"] > 0
    assert payload["step_gflops"] < payload["matmul_gflops_inside_step"]
    assert len(payload["top_ops"]) == 5


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_bench_gemm_library_times_every_contestant_after_checking_the_onednn_loop(tmp_path):
    """`bench_gemm_library.py`: the experts loop through oneDNN gives `eager`'s logits and gradients (to fp32
    rounding); every contestant is timed in every counted round; both libraries' GEMM rates are reported."""
    payload = _run_on_the_toy_preset(tmp_path, "bench_gemm_library.py", "--rounds", "2", "--warmup_rounds", "1")
    assert set(payload["step_seconds"]) == {"grouped_mm", "eager", "eager-onednn"}
    assert all(len(values) == 2 and min(values) > 0 for values in payload["step_seconds_per_round"].values())
    assert payload["speedup_vs_grouped_mm"]["grouped_mm"] == 1.0
    assert set(payload["gemm_gflops"]) == {"torch.matmul", "onednn"} and min(payload["gemm_gflops"].values()) > 0
    assert 0 <= payload["onednn_max_relative_difference"] < 1e-4
    # per MoE layer and expert with rows: 2 products forward, 4 backward
    assert payload["onednn_products_per_step"] % 6 == 0 and payload["onednn_products_per_step"] > 0

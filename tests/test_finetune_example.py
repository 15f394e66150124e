"""examples/finetune_with_trainer.py at toy size on CPU: LoRA (attention + 3D expert weights) and full fine-tuning."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from .conftest import save_tiny_checkpoint

EXAMPLE = Path(__file__).parents[1] / "examples" / "finetune_with_trainer.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_with_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, example) -> Path:
    """A toy ReMoE checkpoint with a tokenizer that knows the instruction text."""
    folder = tmp_path_factory.mktemp("base")
    rows = example.builtin_instructions()
    texts = [example.PROMPT.format(**row) + row["output"] for row in rows]
    save_tiny_checkpoint(folder, texts, vocab_size=320, max_position_embeddings=128, l1_coef_init=1e-4)
    return folder


def _run(example, checkpoint: Path, output: Path, *flags: str) -> dict:
    base = ["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--use_cpu"]
    common = ["--per_device_train_batch_size", "8", "--logging_steps", "5", "--save_steps", "1000"]
    return example.main([*base, *common, *flags])


def test_lora_on_attention_and_experts_with_the_controller(example, checkpoint, tmp_path):
    output = tmp_path / "lora"
    results = _run(
        example,
        checkpoint,
        output,
        "--lora",
        "--merge",
        "--lora_rank",
        "2",
        "--max_steps",
        "30",
        "--learning_rate",
        "1e-2",
    )

    assert results["steps"] == 30 and results["loss_after"] < results["loss_before"] - 0.3
    # The controller ran once per optimizer step: lambda moved with the sparsity (well below the 0.75 target here).
    history = results["history"]
    assert [entry["step"] for entry in history] == list(range(1, 31))
    assert history[-1]["remoe/l1_coef"] == pytest.approx(1e-4 * 1.2**30, rel=1e-4)

    adapter = load_file(output / "adapter_model.safetensors")
    names = set(adapter)
    assert any("self_attn.q_proj.lora_A" in name for name in names)
    assert any("mlp.experts.lora_A" in name for name in names)  # a LoRA on each 3D expert parameter
    assert any("mlp.router" in name for name in names)  # the router is trained in full
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_parameters"]) == sorted(example.EXPERTS)
    base_parameters = sum(t.numel() for t in load_file(checkpoint / "model.safetensors").values())
    assert results["trainable_parameters"] < 0.1 * base_parameters

    # The merged model is a plain ReMoE checkpoint: new expert and attention weights, the model's loss.
    merged = AutoModelForCausalLM.from_pretrained(output / "merged")
    before = load_file(checkpoint / "model.safetensors")
    after = merged.state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert after[name].shape == before[name].shape and not torch.equal(after[name], before[name])
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])  # not adapted
    tokenized = example.tokenize(
        example.load_instructions("builtin"), example.AutoTokenizer.from_pretrained(output), 128
    )
    collator = example.PadCollator(merged.config.pad_token_id)
    assert example.response_loss(merged, tokenized, collator) == pytest.approx(results["loss_after"], abs=1e-4)


def test_full_fine_tuning_and_bad_data(example, checkpoint, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"instruction": "Say hi.", "input": "to Ana", "output": "Hi Ana"}] * 16
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = _run(example, checkpoint, tmp_path / "full", "--data", str(data), "--max_steps", "4")
    assert results["steps"] == 4 and len(results["history"]) == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert model.l1_coef == pytest.approx(results["history"][-1]["remoe/l1_coef"])
    with pytest.raises(ValueError, match="no such file"):
        _run(example, checkpoint, tmp_path / "x", "--data", str(tmp_path / "missing.jsonl"))

"""`remoe generate`: completions through `model.generate` and the experts each generated token used."""

import json

import pytest
import torch

import remoe
from remoe.training.cli import main

from .conftest import save_tiny_checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "12 + 30 = 42"] * 20


@pytest.fixture(scope="module", params=["relu", "topk"])
def model_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"generate-{request.param}")
    save_tiny_checkpoint(folder, TEXTS, vocab_size=300, router_type=request.param)
    return folder


def test_greedy_completion_matches_a_manual_argmax_loop(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "def add", "--max_new_tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]

    model = remoe.ReMoEForCausalLM.from_pretrained(model_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("def add", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id], dim=1)
    expected = tokenizer.decode(ids[0, len(tokenizer("def add")["input_ids"]) :], skip_special_tokens=True)
    assert result["prompt"] == "def add" and result["completion"] == expected


def test_show_routing_reports_the_experts_of_every_new_token(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "12 +", "The", "--max_new_tokens", "4", "--show_routing"]
    assert main([*args, "--json", "--do_sample", "--temperature", "0.8", "--seed", "3"]) == 0
    results = json.loads(capsys.readouterr().out)
    config = remoe.ReMoEConfig.from_pretrained(model_dir)
    moe_layers = sum(config.is_moe_layer(layer) for layer in range(config.num_hidden_layers))
    assert [r["prompt"] for r in results] == ["12 +", "The"]
    for result in results:
        assert 1 <= len(result["routing"]) <= 4
        for entry in result["routing"]:
            assert len(entry["experts_per_layer"]) == moe_layers
            if config.router_type == "topk":
                assert entry["experts_per_layer"] == [config.num_experts_per_tok] * moe_layers
            else:
                assert all(0 <= count <= config.num_experts for count in entry["experts_per_layer"])
    assert main(args) == 0
    assert "experts per layer" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_new_tokens", "0"], "max_new_tokens"),
        (["--top_p", "1.5"], "top_p"),
        (["--temperature", "0"], "temperature"),
    ],
)
def test_bad_generation_options_fail_with_a_clear_message(model_dir, capsys, flags, message):
    assert main(["generate", str(model_dir), "--prompt", "x", *flags]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_folder_fails_with_a_clear_message(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err

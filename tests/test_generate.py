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
    from transformers import AutoTokenizer

    assert main(["generate", str(model_dir), "--prompt", "def add", "--max_new_tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    input_ids = AutoTokenizer.from_pretrained(model_dir)("def add", return_tensors="pt")["input_ids"]
    assert result == {"prompt": "def add", "completion": _greedy_completion(model_dir, input_ids, 6)}


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


def _greedy_completion(model_dir, input_ids: torch.Tensor, new_tokens: int) -> str:
    """A manual argmax loop without a cache: the reference for greedy `model.generate`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = remoe.ReMoEForCausalLM.from_pretrained(model_dir).eval()
    ids = input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id], dim=1)
    return tokenizer.decode(ids[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_streamed_output_is_the_printed_output(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "def add", "The", "--max_new_tokens", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == printed
    assert printed.startswith("def add") and "\nThe" in printed


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("generate-chat")
    save_tiny_checkpoint(folder, TEXTS, vocab_size=300, router_type="relu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_answers_the_prompt_as_a_user_turn_of_the_chat_template(chat_model_dir, capsys):
    from transformers import AutoTokenizer

    args = ["generate", str(chat_model_dir), "--prompt", "12 +", "--chat", "--system", "add", "--max_new_tokens", "5"]
    assert main([*args, "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    rendered = "<|system|>add\n<|user|>12 +\n<|assistant|>"
    input_ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert result == {"prompt": "12 +", "completion": _greedy_completion(chat_model_dir, input_ids, 5)}

    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == f"> 12 +\n{result['completion']}\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chat"], "has no chat template"),
        (["--system", "be brief"], "--system is the system message of a chat"),
        (["--stream", "--json"], "--stream prints text as it is generated"),
    ],
)
def test_chat_and_stream_options_that_cannot_apply_fail_with_a_clear_message(model_dir, capsys, flags, message):
    assert main(["generate", str(model_dir), "--prompt", "x", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content",
    ['{"max_new_tokens": "many"}', '{"max_new_tokens": -3}', "{not json"],
    ids=["wrong type", "invalid value", "not json"],
)
def test_a_broken_generation_config_is_one_error_naming_the_file(model_dir, tmp_path, capsys, content):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "generation_config.json").write_text(content)
    assert main(["generate", str(folder), "--prompt", "x", "--max_new_tokens", "2"]) == 2
    error = capsys.readouterr().err
    assert f"{folder / 'generation_config.json'}: not a valid generation config" in error
    assert "Traceback" not in error

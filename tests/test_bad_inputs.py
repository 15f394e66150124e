"""Bad input through the real command line (`remoe_cli.main`): exit status 2, one line naming the file or field, and
nothing in the output folder changed. Also the warnings and fixes where a run can go on."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import remoe_cli
import torch
import yaml
from safetensors.torch import load_file, save_file

from remoe.training.trainer import CHECKPOINT_COMPLETE

from .conftest import SMALL_MODEL, fails_with_one_line, write_word_documents

RUN = {
    "model": {**SMALL_MODEL, "l1_coef_init": 1e-4},
    "data": {"vocab_size": 300, "block_size": 16, "max_eval_blocks": 2},
    "training": {
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_steps": 2,
        "disable_tqdm": True,
    },
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    write_word_documents(root / "data.jsonl", 200)
    run = {**RUN, "data": {**RUN["data"], "dataset": str(root / "data.jsonl")}}
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    return root


@pytest.fixture(scope="module")
def trained(workspace) -> Path:
    """A finished `remoe train` run: checkpoint-2, checkpoint-4, the final model, metrics."""
    output = workspace / "trained"
    assert remoe_cli.main(["train", "--config", str(workspace / "run.yaml"), "--output_dir", str(output)]) == 0
    return output


def _copy_model(trained: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for path in trained.iterdir():
        if path.is_file():
            shutil.copy2(path, destination / path.name)
    return destination


def _write_yaml(workspace: Path, name: str, text: str) -> Path:
    path = workspace / name
    path.write_text(text)
    return path


# ---- run configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "num_expert", 2, "unknown key model.num_expert; did you mean 'num_experts'?"),
        ("data", "max_eval_block", 4, "unknown key data.max_eval_block; did you mean 'max_eval_blocks'?"),
        ("training", "learning_rat", 1e-3, "unknown key training.learning_rat; did you mean 'learning_rate'?"),
        ("model", "num_experts", "four", "num_experts"),
        ("training", "max_steps", "five", "training.max_steps must be"),
        ("data", "block_size", "16", "data.block_size must be int"),
        ("model", "vocab_size", 100, "model.vocab_size comes from the tokenizer"),
        ("training", "output_dir", "elsewhere", "training.output_dir is set by remoe train; use --output_dir"),
        ("training", "lr_scheduler_type", "sideways", "training.lr_scheduler_type must be one of"),
    ],
)
def test_bad_keys_and_values_in_the_run_file(workspace, tmp_path, capsys, section, key, value, message):
    run = yaml.safe_load((workspace / "run.yaml").read_text())
    run[section][key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    fails_with_one_line(capsys, ["train", "--config", path, "--output_dir", tmp_path / "out"], message)
    assert not (tmp_path / "out").exists()


def test_triton_experts_for_a_cpu_run(workspace, tmp_path, capsys, monkeypatch):
    """Refused before any work: the Triton kernels need CUDA (or the interpreter) and the run trains on CPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run = yaml.safe_load((workspace / "run.yaml").read_text())
    run["model"]["experts_implementation"] = "triton"
    run["training"]["use_cpu"] = True
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    message = "model.experts_implementation 'triton' needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    fails_with_one_line(capsys, ["train", "--config", path, "--output_dir", tmp_path / "out"], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5\n", "must be a YAML mapping"),
        ("- model\n- data\n", "must be a YAML mapping"),
        ("model: [hidden_size\n", "invalid YAML at line"),
        ("model:\n  - 1\n  - 2\n", "section 'model' must be a mapping"),
        ("models: {}\n", "top-level keys must be among"),
    ],
)
def test_run_files_that_are_not_run_configurations(workspace, tmp_path, capsys, text, message):
    path = _write_yaml(tmp_path, "bad.yaml", text)
    fails_with_one_line(capsys, ["train", "--config", path, "--output_dir", tmp_path / "out"], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "tiny"], "--config and --preset both"),
        (["--router_type", "dense", "--freeze_experts"], "no experts to freeze"),
        (["--block_size", "512"], "data.block_size (512) exceeds the model's max_position_embeddings (64)"),
        (["--num_experts", "1000000"], "GiB per process for fp32 weights, gradients and AdamW state"),
        (["--tokenizer", "/no/such/tokenizer"], "--tokenizer '/no/such/tokenizer': no such folder"),
    ],
)
def test_combinations_and_machine_limits_fail_before_any_work(workspace, tmp_path, capsys, flags, message):
    argv = ["train", "--config", workspace / "run.yaml", "--output_dir", tmp_path / "out", *flags]
    fails_with_one_line(capsys, argv, message)
    assert not (tmp_path / "out").exists()


# ---- output folders ------------------------------------------------------------------------------------------------


def test_a_finished_run_is_never_overwritten_silently(workspace, trained, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(trained, output)
    fails_with_one_line(
        capsys, ["train", "--config", workspace / "run.yaml", "--output_dir", output], "already holds files", output
    )
    smaller = workspace / "run.yaml"
    fails_with_one_line(
        capsys,
        ["train", "--config", smaller, "--output_dir", output, "--router_type", "topk", "--resume_from_checkpoint"],
        "holds a run with another model or data",
        output,
    )
    # --overwrite replaces the earlier run: nothing of it is left next to the new one.
    (output / "eval_results.json").write_text("{}")
    argv = [
        "train",
        "--config",
        smaller,
        "--output_dir",
        output,
        "--overwrite",
        "--max_steps",
        "1",
        "--save_steps",
        "5",
    ]
    assert remoe_cli.main([str(arg) for arg in argv]) == 0
    assert not (output / "eval_results.json").exists()
    assert [path.name for path in output.glob("checkpoint-*")] == ["checkpoint-1"]  # the old checkpoint-2, -4 are gone
    assert json.loads((output / "metrics.json").read_text())["train_steps"] == 1


def test_output_folders_that_cannot_be_written(workspace, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["train", "--config", workspace / "run.yaml", "--output_dir", blocker / "run"]
    fails_with_one_line(capsys, argv, "cannot create it", tmp_path)
    fails_with_one_line(
        capsys, ["train", "--config", workspace / "run.yaml", "--output_dir", blocker], "is a file, not a folder"
    )
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(readonly)]).returncode != 0:
        pytest.skip("a read-only folder needs a read-only mount here (tests run as root)")
    try:
        fails_with_one_line(
            capsys, ["train", "--config", workspace / "run.yaml", "--output_dir", readonly / "run"], "cannot write"
        )
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


def test_resume_refuses_what_it_cannot_continue(workspace, trained, tmp_path, capsys):
    run_file = workspace / "run.yaml"
    output = tmp_path / "run"
    shutil.copytree(trained, output)
    base = ["train", "--config", run_file, "--output_dir", output, "--resume_from_checkpoint"]
    fails_with_one_line(capsys, [*base, output], "is a model folder, not a Trainer checkpoint-N", output)
    # A checkpoint whose weights were cut short.
    damaged = output / "checkpoint-4" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    fails_with_one_line(
        capsys, [*base, output / "checkpoint-4"], "checkpoint-4 is damaged: model.safetensors has", output
    )
    # A checkpoint of another model.
    other = tmp_path / "other"
    argv = ["train", "--config", run_file, "--output_dir", other, "--max_steps", "2", "--num_experts", "2"]
    assert remoe_cli.main([str(arg) for arg in argv]) == 0
    fresh = tmp_path / "fresh"
    argv = ["train", "--config", run_file, "--output_dir", fresh, "--resume_from_checkpoint", other / "checkpoint-2"]
    fails_with_one_line(capsys, argv, "holds another model (num_experts: 2 there, 4 asked)")
    assert not fresh.exists()
    # An unmarked checkpoint (a save that a crash interrupted) is not resumable either.
    (other / "checkpoint-2" / CHECKPOINT_COMPLETE).unlink()
    argv = ["train", "--config", run_file, "--num_experts", "2", "--output_dir", other, "--resume_from_checkpoint"]
    fails_with_one_line(capsys, argv, "no complete checkpoint-N", other)


def test_train_loss_after_a_resume_covers_the_whole_run(workspace, trained, tmp_path):
    """Resuming from checkpoint-2 replays steps 3-4 exactly; `train_loss` is the mean of all 4 steps, as uninterrupted."""
    output = tmp_path / "run"
    shutil.copytree(trained, output)
    for name in ("checkpoint-4", "metrics.json", "model.safetensors"):
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    argv = ["train", "--config", workspace / "run.yaml", "--output_dir", output, "--resume_from_checkpoint"]
    assert remoe_cli.main([str(arg) for arg in argv]) == 0
    expected = json.loads((trained / "metrics.json").read_text())["train_loss"]
    assert json.loads((output / "metrics.json").read_text())["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_the_console_line_leaves_per_layer_metrics_to_the_log(workspace, trained, capsys):
    history = json.loads((trained / "log_history.json").read_text())
    assert any("remoe/sparsity/layer_0" in entry for entry in history)
    run_file = workspace / "run.yaml"
    argv = ["train", "--config", run_file, "--output_dir", trained.parent / "console", "--max_steps", "2"]
    capsys.readouterr()
    assert remoe_cli.main([str(arg) for arg in argv]) == 0
    printed = capsys.readouterr()
    logged = [line for line in (printed.out + printed.err).splitlines() if "'remoe/sparsity'" in line]
    assert logged and not any("layer_0" in line for line in logged)


def test_bf16_trains_on_a_cpu(workspace, tmp_path):
    argv = ["train", "--config", workspace / "run.yaml", "--output_dir", tmp_path / "run", "--bf16", "--max_steps", "1"]
    assert remoe_cli.main([str(arg) for arg in argv]) == 0


# ---- data ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "latin1.txt:1: not UTF-8 text (byte 0xe9)"),
        ("broken.jsonl", b'{"text": "fine"}\n{"text": "cut\n', "broken.jsonl:2: invalid JSON"),
        ("number.jsonl", b'{"text": "fine"}\n{"text": 42}\n', "number.jsonl:2: 'text' must be a string, got int 42"),
        ("list.json", b'[{"text": "fine"}, "not a record"]', "list.json:1: expected a JSON object per record"),
        ("null.jsonl", b'{"text": "fine"}\n{"text": null}\n', "null.jsonl:2: 'text' must be a string, got NoneType"),
        ("nokey.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', "nokey.jsonl:2: the record has no 'text' field"),
    ],
)
def test_unreadable_data_files_name_the_file_and_line(workspace, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    argv = ["train", "--config", workspace / "run.yaml", "--dataset", tmp_path / name, "--output_dir", tmp_path / "out"]
    fails_with_one_line(capsys, argv, message)
    assert not (tmp_path / "out").exists()


# ---- checkpoint folders ----------------------------------------------------------------------------------------------


def _commands(model: Path, tmp_path: Path, workspace: Path) -> dict[str, list]:
    return {
        "generate": ["generate", model, "--prompt", "alpha"],
        "analyze": ["analyze", model, "--output_dir", tmp_path / "analysis", "--dataset", workspace / "data.jsonl"],
        "eval": ["eval", model, "--limit", "1"],
        "push": ["push", model, "--repo_id", "acme/model", "--dry_run", tmp_path / "repo"],
        "train": [
            "train",
            "--config",
            workspace / "run.yaml",
            "--model_name_or_path",
            model,
            "--output_dir",
            tmp_path / "out",
        ],
        "btx eval": ["btx", "eval", model, "--dataset", workspace / "data.jsonl", "--block_size", "16"],
        "convert": ["convert", model, "--output_dir", tmp_path / "converted", "--router_type", "topk"],
    }


def _pickle_only(model: Path) -> None:
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")


def _two_layer_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))


def _six_layer_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))


def _llama_model_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _truncated(model: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_header(model: Path) -> None:
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))


def _empty(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"")


def _extra_tensor(model: Path) -> None:
    weights = load_file(model / "model.safetensors")
    weights["model.layers.9.mlp.router.weight"] = torch.zeros(4, 32)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


def _integer_weights(model: Path) -> None:
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int8)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


BROKEN = {
    "pickle weights only": (_pickle_only, "pickle weights ['pytorch_model.bin'], which remoe never loads"),
    "config with fewer layers": (_two_layer_config, "tensors its config does not know"),
    "config with more layers": (_six_layer_config, "the weights lack"),
    "another model type": (_llama_model_type, "model_type is 'llama', not 'remoe'"),
    "truncated weights": (_truncated, "truncated or corrupt"),
    "corrupt header": (_corrupt_header, "not a safetensors file"),
    "empty weights": (_empty, "empty or truncated"),
    "unexpected tensor": (_extra_tensor, "tensors its config does not know"),
    "integer weights": (_integer_weights, "'model.norm.weight' is stored as torch.int8; weights must be floating"),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
@pytest.mark.parametrize("command", ["generate", "analyze", "eval", "push", "train", "btx eval", "convert"])
def test_every_command_refuses_a_broken_checkpoint(workspace, trained, tmp_path, capsys, breakage, command):
    model = _copy_model(trained, tmp_path / "model")
    damage, message = BROKEN[breakage]
    damage(model)
    if breakage == "another model type" and command in ("convert", "btx eval"):
        # These two read Llama checkpoints too: a Llama config over ReMoE weights is a mismatch of tensors for them.
        message = "is dense" if command == "convert" else "missing keys between config and weights"
    fails_with_one_line(capsys, _commands(model, tmp_path, workspace)[command], message, model)
    for produced in ("analysis", "repo", "out", "converted"):
        assert not (tmp_path / produced).exists() or not any((tmp_path / produced).iterdir()), produced


@pytest.mark.parametrize("command", ["generate", "analyze", "eval", "push", "btx eval"])
def test_a_missing_folder_is_one_line(workspace, tmp_path, capsys, command):
    fails_with_one_line(capsys, _commands(tmp_path / "nope", tmp_path, workspace)[command], "no such")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", ""], "every prompt must be non-empty"),
        (["--prompt", "alpha", "--device", "cuda"], "no CUDA GPU"),
        (["--prompt", "alpha", "--device", "tpu:7"], "--device 'tpu:7'"),
        (["--prompt", "alpha", "--temperature", "0.5"], "add --do_sample"),
        (["--prompt", "alpha", "--show_routing", "--top_p", "0"], "top_p must be in (0, 1]"),
    ],
)
def test_generate_options(trained, capsys, flags, message):
    fails_with_one_line(capsys, ["generate", trained, *flags], message)


def test_eval_checks_where_the_results_go_before_evaluating(trained, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fails_with_one_line(
        capsys, ["eval", trained, "--output_path", blocker / "results.json"], "cannot create it", trained
    )
    fails_with_one_line(capsys, ["eval", trained, "--device", "cuda"], "no CUDA GPU", trained)


def test_eval_warns_for_a_context_longer_than_the_model(trained, caplog):
    from remoe.training.evaluation import _check_eval_args

    with caplog.at_level("WARNING"):
        _check_eval_args(trained, None, 1, None, 4096)
    assert "longer than the 64 positions" in caplog.text


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_complete_checkpoints(workspace, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1700k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("a full disk needs a small tmpfs mount here")
    try:
        argv = ["train", "--config", workspace / "run.yaml", "--output_dir", disk / "run", "--save_steps", "1"]
        line = fails_with_one_line(capsys, argv, "No space left on device while writing to")
        assert "removed the unfinished checkpoint-" in line
        folders = sorted(disk.joinpath("run").glob("checkpoint-*"))
        assert all((folder / CHECKPOINT_COMPLETE).is_file() for folder in folders)
        assert not (disk / "run" / ".staging").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)

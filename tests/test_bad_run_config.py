"""Bad `remoe train` run configurations: refused before any work with exit status 2 and one line naming the field,
leaving no output folder behind; the YAML file's own pitfalls (duplicate keys, empty sections, `1e-3` read as text);
and the runs that used to "succeed" without training (a batch larger than the data, a loss that became NaN)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from remoe.training.cli import main
from remoe.training.run_config import check_with_training_arguments, plan_run, resolve_run

from .conftest import SMALL_MODEL, write_word_documents

RUN = {
    "model": {**SMALL_MODEL, "l1_coef_init": 1e-4},
    "data": {"vocab_size": 300, "block_size": 16, "max_eval_blocks": 2},
    "training": {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_steps": 10,
        "disable_tqdm": True,
    },
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-run-config")
    write_word_documents(root / "data.jsonl", 100)
    return root


def _run(workspace: Path) -> dict[str, dict]:
    return {
        "model": dict(RUN["model"]),
        "data": {**RUN["data"], "dataset": str(workspace / "data.jsonl")},
        "training": dict(RUN["training"]),
    }


def _write(folder: Path, run: dict[str, dict] | str, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(run if isinstance(run, str) else yaml.safe_dump(run))
    return path


def _fails(capsys, argv: list, message: str, output: Path) -> str:
    """`remoe train ARGV --output_dir OUTPUT` exits with 2 and one error line containing `message`; no output folder."""
    capsys.readouterr()
    assert main(["train", *[str(arg) for arg in argv], "--output_dir", str(output)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("remoe")]
    assert len(errors) == 1, errors
    assert message in errors[0], errors[0]
    assert not output.exists(), sorted(path.name for path in output.iterdir())
    return errors[0]


# ---- the training section, checked before any work --------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"per_device_eval_batch_size": 0}, "training.per_device_eval_batch_size must be an integer >= 1, got 0"),
        ({"per_device_eval_batch_size": -2}, "training.per_device_eval_batch_size must be an integer >= 1, got -2"),
        ({"learning_rate": float("inf")}, "training.learning_rate must be a finite number > 0, got inf"),
        ({"weight_decay": float("nan")}, "training.weight_decay must be a finite number >= 0, got nan"),
        ({"weight_decay": -1}, "training.weight_decay must be a finite number >= 0, got -1"),
        ({"max_grad_norm": float("nan")}, "training.max_grad_norm must be a finite number >= 0"),
        ({"max_grad_norm": -1}, "training.max_grad_norm must be a finite number >= 0"),
        ({"adam_epsilon": float("nan")}, "training.adam_epsilon must be a finite number > 0, got nan"),
        ({"adam_beta1": 1.5}, "training.adam_beta1 must be a number in [0, 1), got 1.5"),
        ({"adam_beta2": -0.1}, "training.adam_beta2 must be a number in [0, 1), got -0.1"),
        ({"warmup_steps": -3}, "training.warmup_steps must be an integer >= 0 (steps), or a fraction"),
        ({"warmup_steps": 5.5}, "training.warmup_steps must be an integer >= 0 (steps), or a fraction"),
        ({"num_train_epochs": -1}, "training.num_train_epochs must be a finite number > 0, got -1"),
        ({"dataloader_num_workers": -1}, "training.dataloader_num_workers must be an integer >= 0, got -1"),
        ({"label_smoothing_factor": 1.0}, "training.label_smoothing_factor must be a number in [0, 1)"),
        ({"save_steps": 2.5}, "training.save_steps must be an integer >= 1, or a fraction of max_steps"),
        ({"seed": 2**40}, "training.seed must be an integer in [0, 2**32 - 1]"),
        (
            {"max_steps": "1e3"},
            "training.max_steps must be int, got str '1e3' (YAML 1.1 reads 1e3 as text: write 1000)",
        ),
        (
            {"lr_scheduler_type": "cosine_with_min_lr"},
            "lr_scheduler_type 'cosine_with_min_lr' needs exactly one of training.lr_scheduler_kwargs.min_lr",
        ),
        (
            {"lr_scheduler_kwargs": {"min_lr_rate": 5}},
            "training.lr_scheduler_kwargs.min_lr_rate is not an argument of lr_scheduler_type 'linear'",
        ),
        (
            {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 5}},
            "training.lr_scheduler_kwargs.min_lr_rate must be a ratio in [0, 1], got 5",
        ),
        (
            {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycle": 2}},
            "training.lr_scheduler_kwargs.num_cycle is not an argument of lr_scheduler_type 'cosine' (it takes: "
            "num_cycles); did you mean 'num_cycles'?",
        ),
        (
            {"lr_scheduler_type": "warmup_stable_decay"},
            "lr_scheduler_type 'warmup_stable_decay' needs training.lr_scheduler_kwargs.num_decay_steps",
        ),
        ({"lr_scheduler_type": "constant", "lr_scheduler_kwargs": {"num_cycles": 2}}, "takes no arguments"),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "evaluates once, at the end"),
        ({"report_to": "x"}, "training.report_to must be 'none', 'all' or among"),
        ({"report_to": ["none", "tensorboard"]}, "training.report_to 'none' stands alone"),
        # Found by the throwaway TrainingArguments (its own checks), before the data work.
        ({"load_best_model_at_end": True}, "training.load_best_model_at_end: refused by TrainingArguments"),
        ({"fp16": True, "bf16": True}, "training.bf16, training.fp16: refused by TrainingArguments"),
    ],
)
def test_bad_training_values_are_refused_before_any_work(workspace, tmp_path, capsys, values, message):
    run = _run(workspace)
    run["training"].update(values)
    path = _write(tmp_path, run)
    line = _fails(capsys, ["--config", path], message, tmp_path / "out")
    assert line.startswith(f"remoe train: error: {path}: ")


def test_fields_remoe_sets_by_default_can_be_changed(workspace, tmp_path):
    """`data_seed` and `report_to` (remoe's defaults: the run's seed, tensorboard) pass through to the Trainer."""
    run = _run(workspace)
    run["training"].update(data_seed=3, report_to="none")
    plan = plan_run({"config": str(_write(tmp_path, run)), "output_dir": str(tmp_path / "out")})
    args = plan.training_arguments()
    assert (args.seed, args.data_seed, args.report_to) == (42, 3, [])
    default = plan_run(
        {"config": str(_write(tmp_path, _run(workspace), "plain.yaml")), "output_dir": str(tmp_path / "o2")}
    )
    args = default.training_arguments()
    assert (args.data_seed, args.report_to, args.logging_nan_inf_filter) == (42, ["tensorboard"], False)


def test_the_throwaway_training_arguments_leave_nothing_behind(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan_run({"config": str(_write(tmp_path, _run(workspace))), "output_dir": str(tmp_path / "out")})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.yaml"]
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_no_throwaway_training_arguments_under_a_launcher(monkeypatch):
    """Under a launcher, building `TrainingArguments` would join the process group before the data work: only the
    explicit checks run there (the run's own `TrainingArguments` is built before the output folder is claimed)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_with_training_arguments({"load_best_model_at_end": True}, "run.yaml")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"run.yaml: training.load_best_model_at_end: refused by TrainingArguments"):
        check_with_training_arguments({"load_best_model_at_end": True}, "run.yaml")
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


# ---- flags that were ignored silently ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokenizer", ""], "--tokenizer is empty"),
        (
            ["--model_name_or_path", "/no/such/checkpoint", "--vocab_size", "500"],
            "--vocab_size 500 sizes the BPE tokenizer trained on the corpus, and --model_name_or_path brings its own",
        ),
        (["--tokenizer", "/no/such/tokenizer", "--vocab_size", "500"], "--tokenizer brings its own tokenizer"),
    ],
)
def test_tokenizer_flags_that_would_be_ignored(workspace, tmp_path, capsys, flags, message):
    _fails(capsys, ["--config", _write(tmp_path, _run(workspace)), *flags], message, tmp_path / "out")


def test_an_empty_tokenizer_in_the_file(workspace, tmp_path, capsys):
    run = _run(workspace)
    run["data"]["tokenizer"] = " "
    _fails(capsys, ["--config", _write(tmp_path, run)], "data.tokenizer is empty", tmp_path / "out")


# ---- the YAML file -------------------------------------------------------------------------------------------------


def _yaml_text(workspace: Path) -> str:
    return yaml.safe_dump(_run(workspace))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text + "model:\n  num_experts: 2\n", "duplicate key 'model' at line"),
        (
            lambda text: text.replace("  learning_rate: 0.001\n", "  learning_rate: 0.001\n  learning_rate: 0.01\n"),
            "duplicate key 'learning_rate' at line",
        ),
        (
            lambda text: text.split("model:")[0] + "model:\ntraining:" + text.split("training:")[1],
            "section 'model' (line",
        ),
        (lambda text: "", "the file is empty"),
        (lambda text: "# only a comment\n", "the file is empty"),
    ],
    ids=["duplicate-section", "duplicate-nested-key", "empty-section", "empty-file", "comments-only"],
)
def test_yaml_pitfalls(workspace, tmp_path, capsys, edit, message):
    path = _write(tmp_path, edit(_yaml_text(workspace)))
    line = _fails(capsys, ["--config", path], message, tmp_path / "out")
    assert str(path) in line


def test_the_line_of_a_duplicate_and_of_an_empty_section(workspace, tmp_path, capsys):
    text = "data:\n  block_size: 16\nmodel:\n  num_experts: 4\nmodel:\n  num_experts: 2\n"
    _fails(
        capsys,
        ["--config", _write(tmp_path, text)],
        "duplicate key 'model' at line 5 (first at line 3)",
        tmp_path / "o",
    )
    text = "data:\n  block_size: 16\nmodel:\ntraining:\n  max_steps: 2\n"
    _fails(capsys, ["--config", _write(tmp_path, text)], "section 'model' (line 3) is empty", tmp_path / "o")


def test_merge_keys_may_override(workspace, tmp_path):
    """YAML merge keys are not duplicates: the explicit key wins over the merged one, as YAML says."""
    run = _run(workspace)
    text = yaml.safe_dump({"data": run["data"], "model": run["model"]})
    text += "training:\n  <<: {max_steps: 5, learning_rate: 0.01}\n  max_steps: 2\n"
    resolved = resolve_run({"config": str(_write(tmp_path, text))})
    assert (resolved["training"]["max_steps"], resolved["training"]["learning_rate"]) == (2, 0.01)


def test_numbers_that_yaml_reads_as_text_are_accepted(workspace, tmp_path):
    """`1e-3` (no dot) is a string in YAML 1.1: the float fields take it as the number it is."""
    text = _yaml_text(workspace)
    text = text.replace("learning_rate: 0.001", "learning_rate: 1e-3").replace(
        "l1_coef_init: 0.0001", "l1_coef_init: 1e-4"
    )
    text = text.replace("  logging_steps: 1\n", "  logging_steps: 1\n  lr_scheduler_type: cosine_with_min_lr\n")
    text = text.replace("  max_steps: 2\n", "  max_steps: 2\n  lr_scheduler_kwargs: {min_lr: 1e-5}\n")
    path = _write(tmp_path, text)
    assert "1e-3" in path.read_text() and isinstance(yaml.safe_load(path.read_text())["training"]["learning_rate"], str)
    run = resolve_run({"config": str(path)})
    assert run["training"]["learning_rate"] == 1e-3 and isinstance(run["training"]["learning_rate"], float)
    assert run["model"]["l1_coef_init"] == 1e-4 and isinstance(run["model"]["l1_coef_init"], float)
    assert run["training"]["lr_scheduler_kwargs"] == {"min_lr": 1e-5}
    plan = plan_run({"config": str(path), "output_dir": str(tmp_path / "out")})
    assert plan.training_arguments().learning_rate == 1e-3


# ---- after the data work: runs that trained nothing, or trained into NaN ------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--per_device_train_batch_size", "100000"], "per_device_train_batch_size (100000) exceeds the "),
        (
            ["--gradient_accumulation_steps", "100000"],
            "per_device_train_batch_size (2) x gradient_accumulation_steps (100000) = 200000 blocks per optimizer "
            "step exceeds the ",
        ),
    ],
)
def test_a_batch_larger_than_the_data_is_refused_before_training(workspace, tmp_path, capsys, flags, message):
    line = _fails(capsys, ["--config", _write(tmp_path, _run(workspace)), *flags], message, tmp_path / "out")
    assert "training blocks of 16 tokens" in line


def test_a_run_whose_loss_becomes_nan_fails_and_saves_no_final_model(workspace, tmp_path, capsys):
    run = _run(workspace)
    run["training"].update(learning_rate=1e30, max_grad_norm=0.0)
    output = tmp_path / "out"
    capsys.readouterr()
    assert main(["train", "--config", str(_write(tmp_path, run)), "--output_dir", str(output)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("remoe train: error:")]
    assert len(errors) == 1 and "the training loss became" in errors[0], errors
    assert "lower training.learning_rate (now 1e+30)" in errors[0]
    assert not (output / "model.safetensors").exists() and not (output / "metrics.json").exists()
    assert not list(output.glob("checkpoint-*"))  # the step whose loss was NaN is not saved either

"""`remoe eval` (lm-evaluation-harness with the local tasks) and the `evaluate` metrics for Trainer."""

import json
import math
import re
import sys

import datasets
import pytest
import remoe_cli as command_line
import torch
from transformers import Trainer, TrainingArguments

import remoe
from remoe.training.evaluation import (
    LOCAL_TASKS,
    arithmetic_items,
    evaluate_checkpoint,
    heldout_documents,
    task_include_path,
)
from remoe.training.metrics import build_compute_metrics, metric_path, preprocess_logits_for_metrics

from .eval_helpers import lookup_checkpoint, random_checkpoint, trained_checkpoint

pytest.importorskip("lm_eval")
pytest.importorskip("evaluate")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_env_probe(monkeypatch):
    """lm-eval collects `torch.utils.collect_env` info (subprocesses, ~2 s) for every run; not needed here."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def remoe_cli(argv: list[str]) -> int:
    """`remoe ARGV` through the real command line."""
    return command_line.main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def arith_items():
    return arithmetic_items()


def test_local_tasks_come_from_the_heldout_split(arith_items):
    from lm_eval.tasks import TaskManager

    from remoe.training.data import build_embedded_corpus

    corpus = build_embedded_corpus()
    domains = corpus["validation"]["domain"]
    for domain in ("code", "docs"):
        assert len(heldout_documents(domain)) == domains.count(domain) > 0
    train_questions = {
        match[1] for text in corpus["train"]["text"] if (match := re.match(r"Question: (.+)", text)) is not None
    }
    assert len(arith_items) > 500
    for row in arith_items.select(range(200)):
        assert row["question"] not in train_questions  # held out
        assert len(row["choices"]) == len(set(row["choices"])) == 4
        assert row["choices"][row["gold"]] == row["answer"]
        assert row["query"] == f"Question: {row['question']}\nAnswer:"
    assert len({row["gold"] for row in arith_items.select(range(200))}) == 4  # the gold position varies

    manager = TaskManager(include_path=str(task_include_path()), include_defaults=False)
    assert set(LOCAL_TASKS) | {"remoe", "remoe_ppl"} <= set(manager.all_tasks)


def test_remoe_eval_on_a_trained_checkpoint(trained, tmp_path, capsys):
    output = tmp_path / "results.json"
    argv = ["eval", str(trained), "--tasks", "remoe", "--limit", "3", "--output_path", str(output), "--batch_size", "4"]
    assert remoe_cli(argv) == 0
    results = json.loads(output.read_text())

    metrics = results["results"]
    assert set(metrics) == set(LOCAL_TASKS)
    assert {"acc", "acc_stderr", "acc_norm"} <= set(metrics["remoe_arith"])
    assert 0.0 <= metrics["remoe_arith"]["acc"] <= 1.0
    for task in ("remoe_ppl_code", "remoe_ppl_docs"):
        assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(metrics[task])
    for task, values in metrics.items():
        assert all(math.isfinite(value) for value in values.values()), task
        assert results["n_samples"][task]["effective"] == 3

    num_experts = remoe.ReMoEConfig.from_pretrained(trained).num_experts
    assert set(results["domains"]) == {"code", "docs", "math"}
    for domain, stats in results["domains"].items():
        assert stats["documents"] == 3 and stats["tokens"] > 0
        assert 1.0 < stats["token_perplexity"] < 1e4 and math.isfinite(stats["bits_per_byte"])
        assert 0.0 <= stats["routing_sparsity"] <= 1.0
        assert stats["experts_per_token"] == pytest.approx((1 - stats["routing_sparsity"]) * num_experts)
        assert len(stats["routing_sparsity_per_layer"]) == 2, domain
    # The alongside statistics score the same text with lm-eval's rolling windows: same bits per byte.
    for domain in ("code", "docs"):
        expected = metrics[f"remoe_ppl_{domain}"]["bits_per_byte"]
        assert results["domains"][domain]["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    routing = results["routing"]
    assert 0.0 <= routing["sparsity"] <= 1.0 and routing["target_sparsity"] == 0.75
    assert routing["positions"] == sum(stats["routed_positions"] for stats in results["domains"].values())

    printed = capsys.readouterr().out
    assert "remoe_ppl_code" in printed and "bits_per_byte" in printed and "Token ppl" in printed


def test_arithmetic_accuracy_is_real(arith_items, tmp_path):
    perfect = lookup_checkpoint(tmp_path / "perfect", arith_items.select(range(8)))
    results = evaluate_checkpoint(perfect, "remoe_arith", limit=8, output_path=tmp_path / "perfect.json", verbose=False)
    assert results["results"]["remoe_arith"]["acc"] == 1.0

    random_model = random_checkpoint(tmp_path / "random")
    results = evaluate_checkpoint(
        random_model, "remoe_arith", limit=40, output_path=tmp_path / "random.json", verbose=False
    )
    assert 0.05 <= results["results"]["remoe_arith"]["acc"] <= 0.5  # chance is 0.25


def test_plain_lm_eval_command_with_remote_code(arith_items, tmp_path, monkeypatch):
    """The README's `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path ...`."""
    from lm_eval.__main__ import cli_evaluate

    perfect = lookup_checkpoint(tmp_path / "perfect", arith_items.select(range(4)))
    argv = [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={perfect},trust_remote_code=True",
        "--include_path",
        str(task_include_path()),
        "--tasks",
        "remoe_arith",
        "--limit",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "lm_eval_out"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    cli_evaluate()
    (written,) = (tmp_path / "lm_eval_out").rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["results"]["remoe_arith"]["acc,none"] == 1.0
    assert results["config"]["model_args"]["trust_remote_code"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "remoe_arith,remoe_nope"], "remoe_nope"),
        (["--limit", "0"], "limit"),
        (["--batch_size", "0"], "batch_size"),
    ],
)
def test_bad_input_fails_before_evaluating(trained, tmp_path, capsys, argv, message):
    output = tmp_path / "results.json"
    assert remoe_cli(["eval", str(trained), *argv, "--output_path", str(output)]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_missing_checkpoint_fails_clearly(tmp_path, capsys):
    assert remoe_cli(["eval", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_trainer_metrics_from_packaged_evaluate_modules(trained, tmp_path):
    for name in ("token_perplexity", "next_token_accuracy"):
        assert metric_path(name).is_file()  # shipped inside remoe.training: no Hub download

    model = remoe.ReMoEForCausalLM.from_pretrained(trained).eval()
    torch.manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (6, 4))
    with torch.no_grad():  # mostly greedy continuations: the accuracy is well above zero
        sequences = model.generate(prompts, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    sequences[:3, 8:] = torch.randint(0, model.config.vocab_size, (3, 8))
    labels = sequences.clone()
    labels[4, 10:] = -100  # ignored positions must not count
    dataset = datasets.Dataset.from_dict({"input_ids": sequences.tolist(), "labels": labels.tolist()})

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=4, report_to=[], use_cpu=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=dataset,
        compute_metrics=build_compute_metrics(),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    results = trainer.evaluate()

    with torch.no_grad():
        logits = model(sequences).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    nll = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    accuracy = (logits.argmax(-1)[mask] == targets[mask]).float().mean().item()
    assert results["eval_perplexity"] == pytest.approx(nll.exp().item(), rel=1e-4)
    assert results["eval_next_token_accuracy"] == pytest.approx(accuracy)
    assert 0.3 < accuracy < 1.0

    predictions, token_nll = preprocess_logits_for_metrics(model(sequences[:2]).logits, labels[:2])
    assert predictions.shape == token_nll.shape == (2, sequences.shape[1] - 1)  # no (B, T, V) kept

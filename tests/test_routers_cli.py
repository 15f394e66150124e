"""The command line of the ReMoE paper's other baselines (hash, expert_choice, sparsemixer, lory): the router flags of
`remoe train` and `remoe compare`, compare's lm-eval tasks, `remoe analyze` / `remoe generate --show_routing`, the
training curves and the model card of every router type, and the conversions' refusals."""

import json

import pytest
import remoe_cli
import torch
import yaml

import remoe
from remoe.training import compare as compare_module
from remoe.training.cli import main
from remoe.training.run_config import ROUTER_SPECIFIC_FLAGS, resolve_run, write_run_config

from .conftest import save_tiny_checkpoint, tiny_config
from .test_train_cli import SMALL_RUN as TRAIN_CLI_RUN

NEW_ROUTERS = ("hash", "expert_choice", "sparsemixer", "lory")
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "12 + 30 = 42"] * 20
SMALL_RUN = {  # test_train_cli's run without the regulariser's initial coefficient, shorter
    "model": {name: value for name, value in TRAIN_CLI_RUN["model"].items() if name != "l1_coef_init"},
    "data": {**TRAIN_CLI_RUN["data"], "max_eval_blocks": 2},
    "training": {**TRAIN_CLI_RUN["training"], "max_steps": 2, "logging_steps": 1, "save_steps": 2},
}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL_RUN))
    return path


# ------------------------------------------------------------------------------------------------- flags


def test_the_command_line_router_table_is_the_run_configs():
    assert remoe_cli.ROUTER_SPECIFIC_FLAGS == ROUTER_SPECIFIC_FLAGS
    assert set(ROUTER_SPECIFIC_FLAGS.values()) == set(NEW_ROUTERS)
    fields = set(remoe.ReMoEConfig.__dataclass_fields__)
    assert set(ROUTER_SPECIFIC_FLAGS) <= fields  # the flags are named after the config fields


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--router_hash_seed", "-1", "must be an integer >= 0, got -1"),
        ("--router_hash_seed", "seven", "must be an integer >= 0, got 'seven'"),
        ("--router_capacity_factor", "0", "must be a finite number > 0, got 0.0"),
        ("--router_capacity_factor", "inf", "must be a finite number > 0, got inf"),
        ("--router_jitter_eps", "-0.1", "must be a finite number > 0, got -0.1"),
        ("--router_jitter_eps", "nan", "must be a finite number > 0, got nan"),
        ("--router_segment_length", "0", "must be an integer >= 1, got 0"),
    ],
)
def test_bad_router_flag_values_fail_with_one_line_naming_the_flag(capsys, command, flag, value, message):
    assert remoe_cli.main([command, flag, value]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"argument {flag}: {message}" in error[0]


def test_router_flags_reach_the_model_config():
    values = {
        "hash": {"router_hash_seed": 7},
        "expert_choice": {"router_capacity_factor": 1.5},
        "sparsemixer": {"router_jitter_eps": 0.05},
        "lory": {"router_segment_length": 16},
    }
    for router_type, flags in values.items():
        run = resolve_run({"preset": "tiny", "router_type": router_type, **flags})
        assert {name: run["model"][name] for name in flags} == flags
        assert run["model"]["router_type"] == router_type


@pytest.mark.parametrize(("flag", "router_type"), sorted(ROUTER_SPECIFIC_FLAGS.items()))
def test_a_router_flag_for_another_router_is_refused_before_any_work(run_config, tmp_path, capsys, flag, router_type):
    value = "0.5" if flag in ("router_capacity_factor", "router_jitter_eps") else "8"
    output = tmp_path / "run"
    args = ["train", "--config", str(run_config), "--router_type", "relu", f"--{flag}", value]
    assert main([*args, "--output_dir", str(output)]) == 2
    error = capsys.readouterr().err
    assert f"--{flag} applies to router_type {router_type!r} only" in error and "'relu'" in error
    assert not output.exists()


def test_lory_segments_must_be_shorter_than_the_block(run_config, tmp_path, capsys):
    output = tmp_path / "run"
    args = ["train", "--config", str(run_config), "--router_type", "lory", "--output_dir", str(output)]
    assert main([*args, "--router_segment_length", "32"]) == 2  # block_size 32: one segment per sequence
    error = capsys.readouterr().err
    assert "--router_segment_length" in error and "data.block_size (32)" in error and not output.exists()
    assert main([*args, "--num_experts_per_tok", "2"]) == 2
    assert "num_experts_per_tok=1" in capsys.readouterr().err


def test_router_flags_cannot_change_a_continued_checkpoint(tmp_path):
    folder = tmp_path / "lory"
    save_tiny_checkpoint(folder, TEXTS, vocab_size=300, router_type="lory")
    options = {"preset": "tiny", "model_name_or_path": str(folder), "router_segment_length": 8}
    with pytest.raises(ValueError, match="router_segment_length cannot be changed"):
        resolve_run(options)


# ----------------------------------------------------------------------------------------------- compare


def _fake_train(calls):
    """`train` for compare's planning: the run's sections as `remoe train` would write them, and tiny metrics."""

    def train(options):
        calls.append(options)
        run = resolve_run(options)
        run["training"].setdefault("seed", options["seed"])
        folder = compare_module.Path(options["output_dir"])
        write_run_config(folder, run)
        router_type = run["model"]["router_type"]
        metrics = {
            "router_type": router_type,
            "validation_loss": 2.0 + options["seed"],
            "validation_perplexity": 7.0,
            "seed": options["seed"],
            "tokens_per_second": 100.0,
            "active_parameters": 10,
            "total_parameters": 20,
        }
        if router_type != "dense":
            metrics.update(validation_sparsity=0.75, validation_experts_per_token=1.0, target_sparsity=None)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "log_history.json").write_text(json.dumps([{"step": 1, "loss": 3.0, "remoe/sparsity": 0.75}]))

    return train


def test_compare_passes_each_router_flag_to_its_router_runs_only(run_config, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare_module, "train", _fake_train(calls))
    router_types = ("dense", "relu", *NEW_ROUTERS)
    router_options = {
        "router_hash_seed": 3,
        "router_capacity_factor": 2.0,
        "router_jitter_eps": 0.05,
        "router_segment_length": 8,
    }
    output = tmp_path / "compare"
    common = dict(router_types=router_types, num_experts=(4,), seeds=(0,), output_dir=str(output))
    common["train_options"] = {"config": str(run_config)}
    summary = compare_module.compare(**common, router_options={"router_segment_length": 8})
    assert len(calls) == len(router_types)
    saved = {
        router_type: yaml.safe_load(
            (output / compare_module._run_name(router_type, 4, 0) / "run_config.yaml").read_text()
        )
        for router_type in router_types
    }
    assert saved["lory"]["model"]["router_segment_length"] == 8
    assert all("router_segment_length" not in saved[name]["model"] for name in router_types if name != "lory")
    rows = {row["router_type"]: row for row in summary["runs"]}
    assert "sparsity_note" in rows["lory"] and "dominant expert" in rows["lory"]["sparsity_note"]
    table = (output / "compare.md").read_text()
    assert "| lory | 4 |" in table and "0.750*" in table and "dominant expert" in table

    # Every other router's knob now: only those runs change; the lory run (same segment length) and the relu and
    # dense runs are reused, so the other runs' changed settings are refused as stale (they finished without them).
    calls.clear()
    with pytest.raises(ValueError, match="hash-E4-seed0 holds a finished run with other settings"):
        compare_module.compare(**common, router_options=router_options)
    assert calls == []  # found while planning, before anything trains
    monkeypatch.setattr(compare_module, "_check_reusable", lambda run_dir, expected: None)
    plans = []
    original = compare_module.resolve_run
    monkeypatch.setattr(compare_module, "resolve_run", lambda options: plans.append(options) or original(options))
    compare_module.compare(**common, router_options=router_options)
    by_router = {options["router_type"]: options for options in plans}
    for name, router_type in ROUTER_SPECIFIC_FLAGS.items():
        assert by_router[router_type][name] == router_options[name]
        assert all(name not in by_router[other] for other in router_types if other != router_type)


def test_compare_refuses_a_router_flag_without_its_router(run_config, tmp_path):
    with pytest.raises(ValueError, match="--router_segment_length applies to lory runs"):
        compare_module.compare(
            router_types=("relu",), seeds=(0,), output_dir=str(tmp_path), router_options={"router_segment_length": 8}
        )
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        compare_module.compare(router_types=("relu",), seeds=(0,), output_dir=str(tmp_path), eval_tasks=("remoe_nope",))
    with pytest.raises(ValueError, match="--eval_limit applies to --eval_tasks"):
        compare_module.compare(router_types=("relu",), seeds=(0,), output_dir=str(tmp_path), eval_limit=2)
    assert not any(tmp_path.iterdir())


def test_compare_eval_tasks_are_run_once_per_model_and_tabulated(run_config, tmp_path, capsys):
    """A real (2-step) relu run and lory run, the lory flag passed to lory only, lm-eval's remoe_arith on both (2
    documents), then the same compare again: runs and evaluations reused; then a new segment length is refused for
    the lory run alone."""
    output = tmp_path / "compare"
    base = ["compare", "--config", str(run_config), "--router_types", "relu", "lory", "--num_experts", "4"]
    base += ["--seeds", "0", "--output_dir", str(output), "--router_segment_length", "8"]
    args = [*base, "--eval_tasks", "remoe_arith", "--eval_limit", "2"]
    assert main(args) == 0
    relu, lory = output / "relu-E4-seed0", output / "lory-E4-seed0"
    assert "router_segment_length" not in yaml.safe_load((relu / "run_config.yaml").read_text())["model"]
    assert yaml.safe_load((lory / "run_config.yaml").read_text())["model"]["router_segment_length"] == 8
    assert remoe.ReMoEConfig.from_pretrained(lory).segment_length == 8

    summary = json.loads((output / "compare.json").read_text())
    assert summary["eval"] == {"tasks": ["remoe_arith"], "limit": 2, "results_file": "compare_eval_results.json"}
    for row in summary["runs"]:
        accuracy = row["eval"]["remoe_arith"]["acc"]
        assert 0.0 <= accuracy["mean"] <= 1.0 and accuracy["std"] == 0.0
        assert "acc_stderr" not in row["eval"]["remoe_arith"]
    for folder in (relu, lory):
        saved = json.loads((folder / "compare_eval_results.json").read_text())
        assert saved["config"]["tasks"] == ["remoe_arith"] and saved["config"]["limit"] == 2
    assert json.loads((lory / "compare_eval_results.json").read_text())["config"]["batch_size"] == 1
    table = (output / "compare.md").read_text()
    assert "remoe_arith acc" in table and "first 2 documents per task" in table

    stamps = {path: path.stat().st_mtime for folder in (relu, lory) for path in folder.glob("*.json")}
    assert main(args) == 0
    assert {path: path.stat().st_mtime for path in stamps} == stamps  # runs and evaluations reused
    capsys.readouterr()
    assert main([*base[:-1], "4"]) == 2  # another segment length: the lory run is stale, the relu one is not
    error = capsys.readouterr().err
    assert "lory-E4-seed0 holds a finished run" in error and "model.router_segment_length: 8 there, 4 asked" in error


def test_compare_labels_and_notes_every_router():
    assert set(compare_module.ROUTER_COLORS) == set(remoe.configuration_remoe.ROUTER_TYPES)
    assert set(compare_module.ROUTER_NAMES) == set(remoe.configuration_remoe.ROUTER_TYPES)
    assert len(set(compare_module.ROUTER_COLORS.values())) == len(compare_module.ROUTER_COLORS)
    assert set(compare_module.SPARSITY_NOTES) == {"lory", "expert_choice"}


# ------------------------------------------------------------------------------- analyze and generate


@pytest.fixture(scope="module", params=NEW_ROUTERS)
def model_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"router-{request.param}")
    save_tiny_checkpoint(folder, TEXTS, vocab_size=300, router_type=request.param)
    return folder


def test_analyze_works_for_every_router(model_dir, tmp_path, capsys):
    from remoe.training.analysis import analyze

    config = remoe.ReMoEConfig.from_pretrained(model_dir)
    summary = analyze(str(model_dir), str(tmp_path / "out"), max_blocks_per_domain=2, block_size=32)
    written = json.loads((tmp_path / "out" / "routing_analysis.json").read_text())
    assert written["router_type"] == config.router_type and written["target_sparsity"] is None
    # Every new router gives each token k experts at inference (Lory: its dominant one; Expert Choice: top-k).
    assert summary["experts_per_token"] == pytest.approx(config.routed_top_k)
    for layer in written["layers"]:
        assert layer["experts_per_token_histogram"][config.routed_top_k] == summary["num_tokens"]
    assert len(written["figures"]) == 5
    printed = capsys.readouterr().out
    assert "dead experts per layer" in printed
    assert "note:" in printed


def test_generate_shows_the_routing_of_every_router(model_dir, capsys):
    config = remoe.ReMoEConfig.from_pretrained(model_dir)
    args = ["generate", str(model_dir), "--prompt", "12 +", "--max_new_tokens", "3", "--show_routing", "--json"]
    assert main(args) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert 1 <= len(result["routing"]) <= 3
    for entry in result["routing"]:
        assert entry["experts_per_layer"] == [config.routed_top_k] * config.num_moe_layers
    assert ("routing_note" in result) is (config.router_type in ("lory", "expert_choice"))
    assert main(args[:-1]) == 0
    assert "experts per layer" in capsys.readouterr().out


def test_lory_generates_without_a_cache_and_the_cli_does_not_force_one(tmp_path):
    folder = tmp_path / "lory"
    save_tiny_checkpoint(folder, TEXTS, vocab_size=300, router_type="lory")
    from remoe.training.generate import generate

    model = remoe.ReMoEForCausalLM.from_pretrained(folder)
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    (result,) = generate(str(folder), ["def add"], max_new_tokens=20, device="cpu")  # beyond one segment (16)
    assert isinstance(result["completion"], str)


def test_expert_choice_routes_per_token_at_inference():
    model = remoe.ReMoEForCausalLM(tiny_config(router_type="expert_choice")).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        alone = model(ids[:1, :5]).logits
        batched = model(ids).logits[:1, :5]
    torch.testing.assert_close(alone, batched)  # causal: neither later tokens nor the batch change a token's experts


# ------------------------------------------------------------------------------------- curves and card


@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_training_curves_draw_a_regularizer_only_for_routers_with_one(tmp_path, monkeypatch, router_type):
    from remoe.training import plots

    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    config = tiny_config(router_type=router_type)
    history = [
        {"step": step, "loss": 5.0 - step / 10, "remoe/loss_lm": 5.0 - step / 10, "remoe/loss_reg": 0.0}
        | {"remoe/sparsity": 0.75, "remoe/l1_coef": 1e-8}
        for step in range(1, 11)
    ]
    if router_type == "sparsemixer":
        for entry in history:
            entry["remoe/loss_reg"] = 0.01
    plots.plot_training_curves(history, config, tmp_path / "curves.png")
    labels = [axis.get_ylabel() for axis in kept[0].axes]
    sparsity = "sparsity (dominant expert)" if router_type == "lory" else "sparsity"
    if router_type == "sparsemixer":  # the Switch balancing loss, as TopK
        assert labels == ["training loss", "balancing loss term", sparsity]
    else:
        assert labels == ["training loss", sparsity]
        assert "(no regulariser)" in kept[0].axes[0].get_title()
    legend = [text.get_text() for text in kept[0].axes[-1].get_legend().get_texts()]
    assert "1 - k/E (k experts per token)" in legend and "target 1 - k/E" not in legend
    monkeypatch.undo()  # the real `close` again (the patched one appends to `kept`)
    for fig in kept:
        plots.plt.close(fig)


CARD_TEXT = {
    "expert_choice": [
        "routing depends on the other tokens of the batch",
        "each expert picks its top-C tokens",
        "At inference each token takes its top-k experts by the same scores, a departure from the paper",
        "batch-level routing is non-causal",
        "so causal evaluation and generation use the per-token rule",
        "| Regulariser | none (balanced by construction",
    ],
    "lory": [
        "There is no KV cache: generation recomputes the sequence at every step",
        "The first segment is routed by itself with stop-gradient",
        "| Regulariser | none (soft merging",
        "| Segment length (tokens) | 16 |",
        "Lory has no KV cache",
    ],
    "hash": ["Routing is a fixed random token-id hash: there are no router parameters", "| Regulariser | none (fixed"],
    "sparsemixer": ["GRIN", "gradient estimator", "| Load-balancing loss weight | 0.01 |"],
}


@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_model_card_describes_each_router_honestly(tmp_path, router_type):
    from remoe.hub_cards.card import render_model_card

    model = remoe.ReMoEForCausalLM(tiny_config(router_type=router_type))
    model.save_pretrained(tmp_path)
    card = render_model_card(tmp_path, model=model, repo_id=f"acme/{router_type}")
    for text in CARD_TEXT[router_type]:
        assert text in card, text
    assert "L1 coefficient" not in card and "Target sparsity" not in card
    assert "resets the routing statistics" in card
    if router_type != "sparsemixer":
        assert "Load-balancing loss weight" not in card


# ----------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_conversions_refuse_the_new_routers(tmp_path, capsys, router_type):
    source = tmp_path / router_type
    remoe.ReMoEForCausalLM(tiny_config(router_type=router_type)).save_pretrained(source)
    dense = tmp_path / "dense"
    remoe.ReMoEForCausalLM(tiny_config(router_type="dense")).save_pretrained(dense)
    commands = [
        ["convert", str(source), "--output_dir", str(tmp_path / "a")],
        ["upcycle", str(source), "--num_experts", "4", "--output_dir", str(tmp_path / "b")],
        ["btx", "mix", str(dense), str(source), "--output_dir", str(tmp_path / "c")],
    ]
    for argv in commands:
        assert remoe_cli.main(argv) == 2
        assert f"router_type {router_type!r} cannot be converted" in capsys.readouterr().err
    targets = [
        (["convert", str(dense), "--router_type", router_type, "--output_dir", str(tmp_path / "d")], "convert writes"),
        (["upcycle", str(dense), "--num_experts", "4", "--router_type", router_type, "--output_dir", "e"], "choice"),
        (["btx", "mix", str(dense), str(dense), "--router_type", router_type, "--output_dir", "f"], "choice"),
    ]
    for argv, message in targets:
        assert remoe_cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")

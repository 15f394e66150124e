"""`remoe btx branch|mix|finetune|eval`, `remoe upcycle`, `remoe convert` on the command line (tiny models, tiny data)."""

import json
import math
import re

import pytest
import remoe_cli
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import remoe
from remoe.training.data import train_tokenizer

from .conftest import TINY_ARCH


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

    # BTM: the branch's experts and seed as a top-2 ensemble, in the same table.
    btm_args = [*eval_args, "--max_eval_blocks", "4", "--btm", branch_dir, "--btm_seed_as_expert"]
    assert run_cli([*btm_args, "--output_json", report]) == 0
    printed = capsys.readouterr().out
    assert "| btm-top2 |" in printed and "routing shares of btm-top2" in printed
    btm = json.loads(report.read_text())["btm-top2"]
    assert list(btm["members"]) == ["code", "math", "seed"] and btm["top_k"] == 2
    for domain in ("code", "docs", "math"):
        assert sum(btm["routing_shares"][domain].values()) == pytest.approx(1.0)
        assert sum(btm["mean_weights"][domain].values()) == pytest.approx(1.0)
        assert btm["experts_per_token"][domain] == 2


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
        (["btx", "mix", "{seed}", "{seed}", "--router_renormalize"], "--router_renormalize"),
        (["btx", "mix", "{seed}", "{seed}", "--router_sampling"], "--router_sampling"),
        (["upcycle", "{seed}", "--num_experts", "2", "--router_sampling"], "--router_sampling"),
        (["convert", "{mixtral}", "--router_renormalize"], "--router_renormalize"),
        (["convert", "{seed}", "--router_renormalize"], "MoE sources only"),
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


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_topk_routing_flags_of_mix_upcycle_convert(workspace, tmp_path):
    seed = workspace / "seed"
    mix = ["btx", "mix", seed, seed, "--router_type", "topk"]
    assert run_cli([*mix, "--output_dir", tmp_path / "mix"]) == 0
    assert config_of(tmp_path / "mix")["router_renormalize"] is True  # BTX's router by default
    assert config_of(tmp_path / "mix")["router_sampling"] is False
    assert run_cli([*mix, "--no_router_renormalize", "--output_dir", tmp_path / "old"]) == 0
    assert config_of(tmp_path / "old")["router_renormalize"] is False
    sample = [*mix, "--num_experts_per_tok", "1", "--router_sampling", "--output_dir", tmp_path / "sample"]
    assert run_cli(sample) == 0
    assert config_of(tmp_path / "sample")["router_sampling"] is True

    upcycle = ["upcycle", seed, "--num_experts", "4", "--num_experts_per_tok", "2", "--router_type", "topk"]
    assert run_cli([*upcycle, "--output_dir", tmp_path / "up"]) == 0
    assert config_of(tmp_path / "up")["router_renormalize"] is True
    assert run_cli([*upcycle, "--no_router_renormalize", "--output_dir", tmp_path / "up-old"]) == 0
    assert config_of(tmp_path / "up-old")["router_renormalize"] is False

    convert = ["convert", tmp_path / "up-old", "--router_type", "topk"]
    assert run_cli([*convert, "--output_dir", tmp_path / "kept"]) == 0  # a ReMoE TopK source keeps its routing
    assert config_of(tmp_path / "kept")["router_renormalize"] is False
    assert run_cli([*convert, "--router_renormalize", "--router_sampling", "--output_dir", tmp_path / "set"]) == 0
    assert config_of(tmp_path / "set")["router_renormalize"] is True
    assert config_of(tmp_path / "set")["router_sampling"] is True


def test_mix_blend_on_the_command_line(workspace, tmp_path, capsys):
    seed = workspace / "seed"
    assert run_cli(["btx", "mix", seed, seed, "--blend", "--output_dir", tmp_path / "blend"]) == 0
    info = json.loads((tmp_path / "blend" / "remoe_conversion.json").read_text())
    assert info["blend"] is True and [e["name"] for e in info["experts"]] == ["blend-0", "blend-1"]
    centroid = ["btx", "mix", seed, seed, "--blend", "--router_init", "centroid", "--domains", "code", "math"]
    assert run_cli([*centroid, "--output_dir", tmp_path / "bad"]) == 2
    assert "blend (--blend)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_finetune_keeps_the_checkpoints_routing_unless_a_flag_is_given(workspace, tmp_path, capsys):
    upcycle = ["upcycle", workspace / "seed", "--num_experts", "2", "--num_experts_per_tok", "2"]
    assert run_cli([*upcycle, "--router_type", "topk", "--output_dir", tmp_path / "topk"]) == 0
    finetune = ["btx", "finetune", tmp_path / "topk", "--config", workspace / "run.yaml", "--max_steps", "1"]
    assert run_cli([*finetune, "--output_dir", tmp_path / "kept"]) == 0
    assert config_of(tmp_path / "kept")["router_renormalize"] is True
    assert config_of(tmp_path / "kept")["router_sampling"] is False
    capsys.readouterr()
    flags = ["--no_router_renormalize", "--router_sampling"]
    assert run_cli([*finetune, *flags, "--output_dir", tmp_path / "changed"]) == 0
    assert "--no_router_renormalize" in capsys.readouterr().out  # the printed `remoe train` command
    assert config_of(tmp_path / "changed")["router_renormalize"] is False
    assert config_of(tmp_path / "changed")["router_sampling"] is True

    assert run_cli([*upcycle, "--output_dir", tmp_path / "relu"]) == 0
    relu = ["btx", "finetune", tmp_path / "relu", "--config", workspace / "run.yaml", "--router_sampling"]
    assert run_cli([*relu, "--output_dir", tmp_path / "bad"]) == 2
    assert "--router_sampling applies to TopK models" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ---- BTM: the branch models as an ensemble ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_models(workspace):
    """Three dense Llama models with the workspace's tokenizer and different weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "seed")
    paths = []
    for index in range(3):
        torch.manual_seed(100 + index)
        config = LlamaConfig(**TINY_ARCH, vocab_size=len(tokenizer), initializer_range=0.1 * (index + 1))
        path = workspace / f"member{index}"
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def reference_btm_losses(paths, data, block_size, max_blocks, prior, top_k) -> dict[str, float]:
    """BTM by hand, in float64: the domain posterior from each model's likelihood of the prefix, top-k kept and
    renormalised, the full next-token distributions mixed."""
    from transformers import AutoTokenizer

    from remoe.training.data import load_text_dataset, pack_dataset

    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    validation = pack_dataset(load_text_dataset(str(data), seed=42)["validation"], tokenizer, block_size)
    models = [AutoModelForCausalLM.from_pretrained(path).eval() for path in paths]
    losses = {}
    for domain in ("code", "docs", "math"):
        rows = [row["input_ids"] for row in validation if row["domain"] == domain][:max_blocks]
        nll, count = 0.0, 0
        for ids in rows:
            with torch.no_grad():
                probs = [m(torch.tensor([ids])).logits[0].double().softmax(-1) for m in models]  # (T, V) each
            for t in range(len(ids) - 1):  # predict ids[t + 1] from ids[: t + 1]
                posterior = [
                    prior[j] * math.prod(float(probs[j][s - 1, ids[s]]) for s in range(1, t + 1))
                    for j in range(len(models))
                ]
                kept = sorted(range(len(models)), key=lambda j: -posterior[j])[:top_k]
                total = sum(posterior[j] for j in kept)
                mixed = sum(posterior[j] / total * probs[j][t] for j in kept)
                nll -= math.log(float(mixed[ids[t + 1]]))
                count += 1
        losses[domain] = nll / count
    return losses


@pytest.mark.parametrize(("prior", "top_k"), [((0.5, 0.3, 0.2), 2), ((0.2, 0.3, 0.5), 1), ((1 / 3, 1 / 3, 1 / 3), 3)])
def test_btm_ensemble_matches_a_hand_computed_reference(workspace, three_models, prior, top_k):
    from remoe.training.btx import evaluate_btm

    data, block_size, max_blocks = workspace / "data", 12, 2
    result = evaluate_btm(
        three_models, top_k=top_k, prior=prior, dataset=str(data), block_size=block_size, max_eval_blocks=max_blocks
    )
    reference = reference_btm_losses(three_models, data, block_size, max_blocks, prior, top_k)
    for domain, loss in reference.items():
        assert result["losses"][domain] == pytest.approx(loss, abs=1e-5), domain
    assert result["model"] == f"btm-top{top_k}" and list(result["members"]) == ["member0", "member1", "member2"]


def test_btm_mixture_with_every_model_is_the_bayesian_model_average():
    """With all M models kept, the ensemble's likelihood of a block is the prior-weighted mean of the models'."""
    from remoe.training.btx import btm_mixture

    log_probs = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)).log()  # (M, B, N)
    log_prior = torch.tensor([0.2, 0.3, 0.5]).log()
    mixture, log_weights = btm_mixture(log_probs, log_prior, top_k=3)
    expected = (log_prior[:, None] + log_probs.sum(dim=-1)).logsumexp(dim=0)  # (B,)
    torch.testing.assert_close(mixture.sum(dim=-1), expected)
    torch.testing.assert_close(log_weights.exp().sum(dim=0), torch.ones(5, 7))
    torch.testing.assert_close(log_weights[:, :, 0].exp(), torch.tensor([0.2, 0.3, 0.5])[:, None].expand(3, 5))
    _, top1 = btm_mixture(log_probs, log_prior, top_k=1)
    assert torch.isfinite(top1).sum(dim=0).eq(1).all()


def test_btm_cached_prior_comes_from_held_out_blocks(workspace, three_models):
    from remoe.training.btx import evaluate_btm

    data = str(workspace / "data")
    cached = evaluate_btm(three_models, prior="cached", prior_blocks=2, dataset=data, block_size=12, max_eval_blocks=2)
    assert cached["model"] == "btm-top2-cached"
    for domain, prior in cached["priors"].items():
        assert sum(prior.values()) == pytest.approx(1.0), domain
        explicit = evaluate_btm(
            three_models, prior=list(prior.values()), dataset=data, block_size=12, max_eval_blocks=2
        )
        assert explicit["losses"][domain] == pytest.approx(cached["losses"][domain], abs=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "needs model folders and/or --btm"),
        (["{m0}", "--btm_top_k", "2"], "--btm_top_k needs --btm"),
        (["--btm", "{m0}"], "at least 2 models"),
        (["--btm", "{m0}", "{m1}", "--btm_top_k", "3"], "top_k (--btm_top_k) must be an integer between 1 and"),
        (["--btm", "{m0}", "{m1}", "--btm_seed_as_expert"], "--btm_seed_as_expert needs one `remoe btx branch`"),
        (["--btm", "{m0}", "{m1}", "--btm_prior", "cached", "--max_eval_blocks", "1000"], "lower --max_eval_blocks"),
        (["--btm", "{m0}", "{other}"], "another tokenizer"),
    ],
)
def test_btm_bad_inputs_are_one_line(workspace, three_models, tmp_path, capsys, flags, message):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(**TINY_ARCH, vocab_size=300)).save_pretrained(other)
    tokenizer = train_tokenizer(["a different corpus entirely"] * 20, vocab_size=280)
    tokenizer.save_pretrained(other)
    assert (
        AutoTokenizer.from_pretrained(other).get_vocab() != AutoTokenizer.from_pretrained(three_models[0]).get_vocab()
    )
    paths = {"m0": three_models[0], "m1": three_models[1], "other": other}
    argv = ["btx", "eval", *[flag.format(**paths) for flag in flags], "--dataset", workspace / "data"]
    capsys.readouterr()
    assert run_cli([*argv, "--block_size", "12"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the datasets progress bars
    assert error.startswith("remoe btx: error:") and message in error, error


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"prior": "flat"}, "prior (--btm_prior) must be one of"),
        ({"prior": [1.0, 2.0]}, "needs 3 finite weights > 0"),
        ({"prior": [1.0, 0.0, 1.0]}, "needs 3 finite weights > 0"),
        ({"top_k": 0}, "top_k (--btm_top_k)"),
        ({"prior": "cached", "prior_blocks": 0}, "prior_blocks (--btm_prior_blocks)"),
    ],
)
def test_btm_bad_options_in_python(three_models, keywords, message):
    from remoe.training.btx import evaluate_btm

    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate_btm(three_models, **keywords)

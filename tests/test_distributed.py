"""Distributed training on CPU: 2 processes over gloo (torchrun), DeepSpeed ZeRO-1/2 with expert parallelism.

Every run goes through `remoe.training.train.train` (tests/dist_workers.py) on a toy model (hidden 32, 2 layers,
4 experts) and a local jsonl dataset. The one-process reference runs the same global batch as gradient accumulation
over the ranks' micro-batches (a rank's micro-batch is a gradient-accumulation micro-batch: same L1 term, same
sparsity statistics), so the distributed runs must reproduce it to fp32 rounding.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from remoe.modeling_remoe import ReMoEExperts, experts_over_active_pairs
from remoe.training.distributed import packaged_deepspeed_config
from remoe.training.train import train
from remoe.training.trainer import is_complete_checkpoint, last_complete_checkpoint

from .conftest import WORDS, save_tiny_checkpoint, tiny_config
from .dist_workers import skip_deepspeed_shm_op

WORKER = Path(__file__).with_name("dist_workers.py")
CLI_HOOKS = Path(__file__).with_name("cli_hooks")
STEPS, SAVE_STEPS, KILL_AT = 6, 2, 6
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


EXPERT_LAYER_CASES = [
    (implementation, expert_1_unused)
    for implementation in ("eager", "batched_mm", "grouped_mm")
    for expert_1_unused in (False, True)
]


def _expert_layer_errors(rank: int, implementation: str, expert_1_unused: bool) -> dict[str, float]:
    from remoe.training.expert_parallel import ExpertParallelExperts, enable_expert_parallel

    torch.manual_seed(0)
    config = tiny_config(num_experts=2, hidden_size=16, intermediate_size=24, experts_implementation=implementation)
    reference = ReMoEExperts(config)
    torch.nn.init.normal_(reference.gate_up_proj, std=0.2)
    torch.nn.init.normal_(reference.down_proj, std=0.2)
    # The global batch: rank 0 holds 5 tokens that all use expert 0 (it sends nothing to rank 1), rank 1 holds 9
    # tokens with 0, 1 or 2 experts each: uneven splits in both directions, and an empty one.
    hidden = torch.randn(14, 16)
    gates = torch.rand(14, 2) * (torch.rand(14, 2) > 0.4)
    gates[:5] = torch.tensor([1.0, 0.0]) * torch.rand(5, 1)
    if expert_1_unused:  # rank 1 receives no row at all
        gates[:, 1] = 0.0
    rows = slice(0, 5) if rank == 0 else slice(5, 14)
    upstream = torch.randn(14, 16)

    block = torch.nn.Module()
    block.router, block.experts = torch.nn.Linear(16, 2), ReMoEExperts(config)
    block.experts.load_state_dict(reference.state_dict())
    enable_expert_parallel(block, ep_size=2)
    assert isinstance(block.experts, ExpertParallelExperts) and block.experts.num_local_experts == 1
    local_hidden, local_gates = hidden[rows].clone().requires_grad_(), gates[rows].clone().requires_grad_()
    output = experts_over_active_pairs(block.experts, local_hidden, local_gates)
    (output * upstream[rows]).sum().backward()

    full_hidden, full_gates = hidden.clone().requires_grad_(), gates.clone().requires_grad_()
    expected = experts_over_active_pairs(reference, full_hidden, full_gates)
    (expected * upstream).sum().backward()
    expert = block.experts.local_experts[0]
    errors = {
        "output": (output - expected[rows]).abs().max().item(),
        "hidden_grad": (local_hidden.grad - full_hidden.grad[rows]).abs().max().item(),
        "gates_grad": (local_gates.grad - full_gates.grad[rows]).abs().max().item(),
        "gate_up_grad": (expert.gate_up_proj.grad - reference.gate_up_proj.grad[rank]).abs().max().item(),
        "down_grad": (expert.down_proj.grad - reference.down_proj.grad[rank]).abs().max().item(),
    }
    gate_up, down = block.experts.gather()
    errors["gathered"] = max(
        (gate_up - reference.gate_up_proj).abs().max().item(), (down - reference.down_proj).abs().max().item()
    )
    return errors


def _expert_layer_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    skip_deepspeed_shm_op()
    for case in EXPERT_LAYER_CASES:  # one pair of processes for every case: process start-up dominates
        results[(rank, *case)] = _expert_layer_errors(rank, *case)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def expert_layer_results():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_expert_layer_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize(("implementation", "expert_1_unused"), EXPERT_LAYER_CASES)
def test_expert_parallel_layer_forward_and_backward_match_the_full_layer(
    expert_layer_results, implementation, expert_1_unused
):
    """One MoE layer's experts over 2 ranks (E=2, one expert per rank): outputs and the gradients of the inputs,
    the gates (kept on the token's rank) and the expert weights (summed over both ranks' tokens) match one process,
    also when one rank's expert receives no token (it must still join the backward all-to-all)."""
    for rank in (0, 1):
        errors = expert_layer_results[(rank, implementation, expert_1_unused)]
        assert max(errors.values()) < 1e-5, errors  # fp32 rounding: two grouped-GEMM orders


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A jsonl corpus, a tokenizer and an initial toy model (saved, so every process starts from the same weights)."""
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS[:18]) for _ in range(rng.randint(20, 60))) for _ in range(300)]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    # l1_coef_init: large enough to move the routing, small enough that no layer ever routes *no* token in a step:
    # then the one-process experts get no gradient at all and torch's AdamW skips them, while DeepSpeed steps them
    # with zero gradients (momentum), a legitimate difference that is not what these tests are about.
    tokenizer = save_tiny_checkpoint(root / "init", docs, vocab_size=300, l1_coef_init=1e-3)
    run = {
        "data": {"dataset": str(root / "data.jsonl"), "block_size": 16, "max_eval_blocks": 4},
        "training": {
            "max_steps": STEPS,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 2,
            "learning_rate": 1e-2,
            # Adam turns a gradient of ~eps into an O(1) step, so fp32 rounding (the distributed runs sum the same
            # terms in another order) of a tiny gradient would move a weight by ~lr. A larger eps keeps that linear.
            "adam_epsilon": 1e-6,
            "logging_steps": 1,
            "save_steps": SAVE_STEPS,
            "disable_tqdm": True,
            "use_cpu": True,
            "train_sampling_strategy": "sequential",  # rank r's batch = the r-th accumulation micro-batch
        },
    }
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    probe = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    (root / "probe.json").write_text(json.dumps(probe.tolist()))
    return root


def _options(workspace: Path, name: str, **overrides) -> dict:
    return {
        "config": str(workspace / "run.yaml"),
        "model_name_or_path": str(workspace / "init"),
        "output_dir": str(workspace / name),
        "probe": json.loads((workspace / "probe.json").read_text()),
        **overrides,
    }


def _launch(
    workspace: Path,
    name: str,
    options: dict,
    nproc: int,
    env: dict | None = None,
    check: bool = True,
    launcher: str = "torchrun",
):
    """Run the worker (with torchrun or the deepspeed launcher for nproc > 1); returns the per-rank results."""
    options_path = workspace / f"{name}.json"
    options_path.write_text(json.dumps(options))
    results = workspace / f"{name}-results"
    command = [sys.executable, str(WORKER), str(options_path), str(results)]
    port = str(_free_port())
    if nproc > 1 and launcher == "torchrun":
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    elif nproc > 1:  # `deepspeed --no_local_rank --num_gpus N script ...` (no --local_rank argument for the script)
        deepspeed = ["-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(nproc)]
        command[1:1] = [*deepspeed, "--master_port", port]
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    if check and process.returncode != 0:
        pytest.fail(f"{name} failed ({process.returncode}):\n{process.stdout[-4000:]}\n{process.stderr[-8000:]}")
    if not check:
        return process
    return [torch.load(results / f"rank{rank}.pt", weights_only=False) for rank in range(nproc)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_weights(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=atol, msg=name)


def _lambdas(result: dict) -> list[float]:
    return [entry["remoe/l1_coef"] for entry in result["history"]]


@pytest.fixture(scope="module")
def reference(workspace):
    """One process, gradient accumulation over the two ranks' micro-batches."""
    options = _options(workspace, "reference", gradient_accumulation_steps=2, num_proc=2)  # tokenizes in 2 processes
    (result,) = _launch(workspace, "reference", options, 1)
    return result


@pytest.fixture(scope="module")
def expert_parallel_run(workspace):
    """EP=2 over 2 ranks with DeepSpeed ZeRO-2; the Trainer builds the optimizer, ReMoETrainer splits its groups."""
    deepspeed = packaged_deepspeed_config("zero2.json")
    options = _options(workspace, "ep2", expert_parallel_size=2, deepspeed=deepspeed)
    return _launch(workspace, "ep2", options, 2)


def test_expert_parallel_matches_one_process(workspace, reference, expert_parallel_run):
    # Same weights, same global batch: logits and loss (rank r holds rows r::2 and half the experts).
    for result in expert_parallel_run:
        torch.testing.assert_close(result["initial"]["logits"], reference["initial"]["logits"], rtol=0, atol=ATOL)
        torch.testing.assert_close(result["initial"]["loss"], reference["initial"]["loss"], rtol=0, atol=ATOL)
    # lambda: one trajectory on every rank, equal to the one-process trajectory (the sparsity is reduced over ranks).
    assert len(_lambdas(reference)) == STEPS
    assert _lambdas(expert_parallel_run[0]) == _lambdas(expert_parallel_run[1]) == _lambdas(reference)
    assert len(set(_lambdas(reference))) > 1
    # Every parameter after 2, 4 and 6 optimizer steps (checkpoints hold all experts, gathered from both ranks).
    for step in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS):
        folder = f"checkpoint-{step}"
        _assert_same_weights(_weights(workspace / "ep2" / folder), _weights(workspace / "reference" / folder))
    _assert_same_weights(_weights(workspace / "ep2"), _weights(workspace / "reference"))
    # Both ranks trained on different data: rank r on the r-th micro-batch of each accumulation step.
    rank0, rank1 = (result["batches"] for result in expert_parallel_run)
    assert rank0 == reference["batches"][0::2] and rank1 == reference["batches"][1::2]


def test_expert_parallel_checkpoint_is_a_plain_transformers_checkpoint(workspace, expert_parallel_run):
    output = workspace / "ep2"
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4  # all experts, Transformers names
    probe = torch.tensor(json.loads((workspace / "probe.json").read_text()))
    with torch.no_grad():
        logits = model(probe).logits
    for result in expert_parallel_run:  # the distributed (sharded) model after training
        torch.testing.assert_close(logits, result["final"]["logits"], rtol=0, atol=ATOL)
    assert model.l1_coef == expert_parallel_run[0]["l1_coef"]
    # DeepSpeed's own state: one file per expert (global ids), ZeRO shards per rank; no staging left behind.
    state = output / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    assert sorted(p.name for p in state.glob("layer_*_expert_*")) == [
        f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" for layer in range(2) for expert in range(4)
    ]
    assert len(list(state.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert not (output / ".staging").exists()
    assert all(is_complete_checkpoint(folder) for folder in output.glob("checkpoint-*"))
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["total_parameters"] == sum(t.numel() for t in model.parameters())


def test_data_parallel_matches_one_process(workspace, reference):
    """Plain DDP (no DeepSpeed): 2 ranks with the same global batch as one process."""
    results = _launch(workspace, "ddp", _options(workspace, "ddp"), 2)
    assert _lambdas(results[0]) == _lambdas(results[1]) == _lambdas(reference)
    _assert_same_weights(_weights(workspace / "ddp"), _weights(workspace / "reference"))
    # Per-rank sharding: disjoint batches that together are the one-process batches.
    rank0, rank1 = (result["batches"] for result in results)
    assert rank0 == reference["batches"][0::2] and rank1 == reference["batches"][1::2]


def test_streaming_shards_the_stream_over_ranks_without_duplicates(workspace):
    """`--streaming`: the train split is an IterableDataset packed on the fly; rank 0 reads it and every rank gets
    its own batches (Accelerate's dispatcher), so no block is trained on twice."""
    results = _launch(workspace, "streaming", _options(workspace, "streaming", streaming=True, max_steps=4), 2)
    blocks = [[tuple(row) for batch in result["batches"] for row in batch] for result in results]
    assert len(blocks[0]) == len(blocks[1]) == 4 * 2
    assert not set(blocks[0]) & set(blocks[1]) and len(set(blocks[0] + blocks[1])) == 16
    assert all(len(block) == 16 for block in blocks[0] + blocks[1])
    assert _lambdas(results[0]) == _lambdas(results[1]) and len(_lambdas(results[0])) == 4
    assert results[0]["metrics"]["validation_loss"] > 0


def _cli(workspace: Path, output: Path, nproc: int, *flags: str, launcher: str = "torchrun", env: dict | None = None):
    """`remoe train` as a user runs it: `torchrun -m remoe.training.cli train ...` (or the deepspeed launcher)."""
    port = str(_free_port())
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
        command += ["-m", "remoe.training.cli"]
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(nproc)]
        command += ["--master_port", port, "--module", "remoe.training.cli"]
    command += ["train", "--config", str(workspace / "run.yaml"), "--model_name_or_path", str(workspace / "init")]
    command += ["--output_dir", str(output), *flags]
    python_path = os.pathsep.join([str(CLI_HOOKS), os.environ.get("PYTHONPATH", "")])
    environment = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": python_path,
        **(env or {}),
    }
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def _assert_relative_difference(actual: dict, expected: dict, limit: float = 1e-4) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        difference = (actual[name] - tensor).norm() / tensor.norm().clamp_min(1e-12)
        assert difference <= limit, (name, difference.item())


@pytest.mark.parametrize(
    ("name", "flags", "resume_launcher"),
    [
        ("crash-dp", ["--expert_parallel_size", "1", "--deepspeed", "AUTO_BATCH"], "torchrun"),
        ("crash-ep2", ["--expert_parallel_size", "2"], "deepspeed"),
    ],
)
def test_cli_killed_while_saving_resumes_to_the_uninterrupted_result(
    workspace, reference, name, flags, resume_launcher
):
    """`remoe train` on 2 processes with DeepSpeed (ZeRO-2 data parallel with `"train_batch_size": "auto"`, or EP=2 on
    the default ZeRO-1 config), rank 1 SIGKILLed while writing checkpoint-6: checkpoints 2 and 4 are complete, 6 is
    left unmarked and ignored; a bare `--resume_from_checkpoint` (under the other launcher for EP=2) continues from
    checkpoint-4 and ends with the parameters of the uninterrupted one-process run."""
    if "AUTO_BATCH" in flags:
        config = json.loads(Path(packaged_deepspeed_config("zero2.json")).read_text())
        config["train_batch_size"] = "auto"  # as in Transformers' DeepSpeed docs
        (workspace / "zero2_auto_batch.json").write_text(json.dumps(config))
        flags = [str(workspace / "zero2_auto_batch.json") if flag == "AUTO_BATCH" else flag for flag in flags]
    output = workspace / name
    crashed = _cli(workspace, output, 2, *flags, env={"REMOE_TEST_KILL_AT_SAVE": str(KILL_AT)})
    assert crashed.returncode != 0
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        f"checkpoint-{KILL_AT}",
    ]
    assert [is_complete_checkpoint(output / f"checkpoint-{step}") for step in (2, 4, KILL_AT)] == [True, True, False]
    assert (output / f"checkpoint-{KILL_AT}" / "model.safetensors").exists()  # written before the kill
    assert last_complete_checkpoint(output) == str(output / "checkpoint-4")
    for step in (2, 4):  # the completed checkpoints are exact so far
        folder = f"checkpoint-{step}"
        _assert_relative_difference(_weights(output / folder), _weights(workspace / "reference" / folder))

    resumed = _cli(workspace, output, 2, *flags, "--resume_from_checkpoint", launcher=resume_launcher)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    _assert_relative_difference(_weights(output), _weights(workspace / "reference"))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(is_complete_checkpoint(folder) for folder in output.glob("checkpoint-*"))
    assert not (output / ".staging").exists()
    history = json.loads((output / "log_history.json").read_text())
    lambdas = [entry["remoe/l1_coef"] for entry in history if "remoe/l1_coef" in entry]
    assert lambdas == pytest.approx(_lambdas(reference), rel=1e-6)  # the restored log and the resumed steps


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        ({"expert_parallel_size": 3}, "2", "must divide num_experts"),
        ({"expert_parallel_size": 2}, "3", "must divide the world size"),
        ({"expert_parallel_size": 2, "deepspeed": "ZERO3"}, "2", "ZeRO stage 3"),
        ({"deepspeed": "/no/such/ds_config.json"}, "1", "ds_config.json"),
        ({"dataset": "/no/such/corpus.jsonl"}, "1", "corpus.jsonl"),
        ({"dataset": "EMPTY"}, "1", "empty"),
        ({"deepspeed": "BATCH=6"}, "2", r"train_batch_size=6 contradicts .* = 4"),
        ({"deepspeed": "MICRO=3"}, "2", "train_micro_batch_size_per_gpu=3 contradicts per_device_train_batch_size = 2"),
    ],
)
def test_bad_input_fails_before_training(workspace, tmp_path, monkeypatch, overrides, world_size, message):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    if overrides.get("deepspeed") == "ZERO3":
        config = json.loads(Path(packaged_deepspeed_config("zero2.json")).read_text())
        config["zero_optimization"]["stage"] = 3
        overrides["deepspeed"] = str(tmp_path / "zero3.json")
        (tmp_path / "zero3.json").write_text(json.dumps(config))
    if str(overrides.get("deepspeed", "")).startswith(("BATCH=", "MICRO=")):
        key = "train_batch_size" if overrides["deepspeed"].startswith("BATCH") else "train_micro_batch_size_per_gpu"
        config = json.loads(Path(packaged_deepspeed_config("zero2.json")).read_text())
        config[key] = int(overrides["deepspeed"].split("=")[1])
        overrides["deepspeed"] = str(tmp_path / "batch.json")
        (tmp_path / "batch.json").write_text(json.dumps(config))
    if overrides.get("dataset") == "EMPTY":
        overrides["dataset"] = str(tmp_path / "empty.jsonl")
        (tmp_path / "empty.jsonl").write_text("")
    options = _options(workspace, "bad", **overrides)
    options["output_dir"] = str(tmp_path / "out")
    options.pop("probe")
    with pytest.raises(ValueError, match=message):
        train(options)
    assert not (tmp_path / "out").exists()


def test_accelerate_launch_deepspeed_settings_are_checked_and_used(workspace, tmp_path, monkeypatch):
    """Under `accelerate launch` with a DeepSpeed plugin, `remoe train` takes Accelerate's DeepSpeed config file (or
    its inline ZeRO stage) and applies the same checks."""
    from remoe.training.distributed import resolve_parallel_options

    def resolve(**options):
        run = {"model": {}, "data": {}, "training": {}}
        return resolve_parallel_options({"model_name_or_path": str(workspace / "init"), **options}, run)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", packaged_deepspeed_config("zero2.json"))
    assert resolve(expert_parallel_size=2)["deepspeed"] == packaged_deepspeed_config("zero2.json")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert resolve(expert_parallel_size=2) == {"deepspeed": None, "expert_parallel_size": 2}  # Accelerate's plugin
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        resolve(expert_parallel_size=2)
    assert resolve() == {"deepspeed": None, "expert_parallel_size": 1}  # ZeRO-3 without EP is fine


def test_lory_refuses_expert_parallel_before_any_work(monkeypatch):
    """Lory merges all experts' parameters per segment: expert parallelism is refused by the run's checks and by
    `enable_expert_parallel` itself, with the field named."""
    from remoe import ReMoEConfig, ReMoEForCausalLM
    from remoe.training.distributed import resolve_parallel_options
    from remoe.training.expert_parallel import enable_expert_parallel

    model = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    model.update(num_attention_heads=2, num_key_value_heads=2, num_experts=4, router_type="lory")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = {"model": model, "data": {}, "training": {}}
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 does not apply to router_type='lory'"):
        resolve_parallel_options({"expert_parallel_size": 2}, run)
    assert resolve_parallel_options({}, run) == {"deepspeed": None, "expert_parallel_size": 1}
    with pytest.raises(ValueError, match="router_type='lory'"):
        enable_expert_parallel(ReMoEForCausalLM(ReMoEConfig(**model)), ep_size=2)


def test_publishing_a_save_replaces_weights_and_keeps_other_files(tmp_path):
    """The staged save's files replace the earlier save's weights (stale shards removed, other files kept), and the
    earlier config.json is gone before any new weight lands."""
    from remoe.training.trainer import _publish_files

    target, staged = tmp_path / "out", tmp_path / "staged"
    target.mkdir()
    staged.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "model-card.md"):
        (target / name).write_text("old")
    (staged / "model.safetensors").write_text("new")
    (staged / "config.json").write_text("new")
    _publish_files(str(staged), str(target))
    assert sorted(path.name for path in target.iterdir()) == ["config.json", "model-card.md", "model.safetensors"]
    assert (target / "config.json").read_text() == "new" and (target / "model-card.md").read_text() == "old"
    assert not staged.exists()

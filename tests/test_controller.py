import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from remoe import ReMoEForCausalLM
from remoe.modeling_remoe import ReMoEL1Controller
from remoe.training import ReMoEControllerCallback, add_controller_callback

from .conftest import tiny_config


def _record(controller: ReMoEL1Controller, active_fraction: float, num_layers=2, num_tokens=100):
    per_expert = active_fraction * num_tokens
    controller.record(torch.full((num_layers, controller.num_experts), per_expert), num_tokens)


def test_sparsity_below_target_multiplies_and_above_divides():
    controller = ReMoEL1Controller(tiny_config(num_experts=8, l1_coef_init=1e-3, l1_coef_multiplier=1.5))
    expected = torch.tensor(1e-3, dtype=torch.float32)
    _record(controller, active_fraction=0.5)  # sparsity 0.5 < 0.875
    metrics = controller.update()
    expected = expected * torch.tensor(1.5, dtype=torch.float32)
    assert metrics["remoe/sparsity"] == pytest.approx(0.5)
    assert controller.l1_coef.item() == expected.item()
    _record(controller, active_fraction=0.05)  # sparsity 0.95 > 0.875
    controller.update()
    expected = expected * torch.tensor(1 / 1.5, dtype=torch.float32)
    assert controller.l1_coef.item() == expected.item()
    assert controller.update() == {}  # nothing recorded since: no update
    assert controller.l1_coef.item() == expected.item()


def test_statistics_accumulate_over_micro_batches():
    controller = ReMoEL1Controller(tiny_config(num_experts=4))
    _record(controller, active_fraction=1.0, num_tokens=30)
    _record(controller, active_fraction=0.0, num_tokens=10)
    metrics = controller.update()
    assert metrics["remoe/sparsity"] == pytest.approx(1 - 30 / 40)
    assert controller.tokens_per_expert is None  # reset for the next step


def _token_dataset(num_rows: int, length: int = 16, vocab: int = 97, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num_rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _trainer(model, output_dir, **arguments) -> tuple[Trainer, ReMoEControllerCallback]:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(arguments)
    trainer = Trainer(model=model, args=TrainingArguments(**values), train_dataset=_token_dataset(64))
    return trainer, add_controller_callback(trainer)


def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path):
    model = ReMoEForCausalLM(tiny_config(num_experts=8, l1_coef_init=1e-6))
    calls = []
    original_record = model.controller.record
    model.controller.record = lambda *args: (calls.append(args[1]), original_record(*args))
    trainer, callback = _trainer(model, tmp_path, max_steps=3, gradient_accumulation_steps=4)
    trainer.train()
    assert [entry["step"] for entry in callback.history] == [1, 2, 3]
    assert calls == [4 * 16] * 12  # every micro-batch was recorded, once
    expected = torch.tensor(1e-6, dtype=torch.float32)
    for entry in callback.history:
        assert entry["remoe/sparsity"] < 0.875  # at initialisation about half the gates are active
        expected = expected * torch.tensor(1.2, dtype=torch.float32)
        assert entry["remoe/l1_coef"] == expected.item()
    assert model.l1_coef == expected.item()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("remoe/sparsity" in entry and "remoe/l1_coef" in entry for entry in logged)


def _markov_dataset(num_rows: int, length: int = 32, vocab: int = 97, seed: int = 0) -> Dataset:
    """Token sequences from a sparse random Markov chain: learnable, so the experts are worth using."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=generator)
    token = torch.randint(0, vocab, (num_rows,), generator=generator)
    sequence = [token]
    for _ in range(length - 1):
        token = successors[token, torch.randint(0, 3, (num_rows,), generator=generator)]
        sequence.append(token)
    ids = torch.stack(sequence, dim=1).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_sparsity_reaches_the_target_and_stays_there(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(num_experts=8, num_experts_per_tok=1, hidden_size=32, intermediate_size=32)
    model = ReMoEForCausalLM(config)
    trainer, callback = _trainer(
        model,
        tmp_path,
        max_steps=300,
        learning_rate=1e-3,
        per_device_train_batch_size=16,
        lr_scheduler_type="constant",
        logging_steps=10,
    )
    trainer.train_dataset = _markov_dataset(300 * 16)
    trainer.train()
    sparsity = [entry["remoe/sparsity"] for entry in callback.history]
    assert len(sparsity) == 300 and sparsity[0] < 0.6  # stage I starts near half-dense
    logged = [entry for entry in trainer.state.log_history if "remoe/sparsity" in entry]
    assert [entry["step"] for entry in logged] == list(range(10, 301, 10))
    # The logged value is the mean over the 10 steps since the previous log.
    assert logged[-1]["remoe/sparsity"] == pytest.approx(sum(sparsity[-10:]) / 10)
    settled = [entry["remoe/sparsity"] for entry in logged if entry["step"] > 150]
    assert all(abs(value - config.target_sparsity) <= 0.02 for value in settled), settled


def test_lambda_survives_trainer_checkpoint_resume_exactly(tmp_path):
    def run(max_steps, resume=None):
        torch.manual_seed(0)
        model = ReMoEForCausalLM(tiny_config(num_experts=8, l1_coef_init=1e-3))
        trainer, _ = _trainer(model, tmp_path / "run", max_steps=max_steps, save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(6)
    lambda_at_3 = ReMoEForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-3").l1_coef
    assert lambda_at_3 != uninterrupted.l1_coef
    resumed = run(6, resume=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.l1_coef == uninterrupted.l1_coef
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = ReMoEForCausalLM(tiny_config(num_experts=8, l1_coef_init=1e-3))
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts buffers at every forward
    tokens = torch.randint(0, 97, (2 + 2 * rank, 16), generator=torch.Generator().manual_seed(rank))
    ddp.train()
    ddp(tokens, labels=tokens).loss.backward()
    local = model.controller.tokens_per_expert.clone()
    local_tokens = model.controller.num_tokens.item()
    gathered = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    metrics = model.update_l1_coef()
    results[rank] = (metrics["remoe/sparsity"], model.l1_coef, local_tokens, torch.stack(gathered))
    dist.destroy_process_group()


def test_sparsity_is_averaged_over_data_parallel_ranks_and_not_overwritten_by_ddp():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    (sparsity_0, coef_0, tokens_0, counts), (sparsity_1, coef_1, tokens_1, _) = results[0], results[1]
    assert (tokens_0, tokens_1) == (32, 64)  # each rank kept its own statistics
    expected = 1 - counts.sum().item() / ((tokens_0 + tokens_1) * 2 * 8)
    assert sparsity_0 == sparsity_1 == pytest.approx(expected)
    assert coef_0 == coef_1
    assert math.isfinite(coef_0)


def _idle_rank_worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = ReMoEForCausalLM(tiny_config(num_experts=8, l1_coef_init=1e-3))
    if rank == 0:  # rank 1 records nothing this step
        tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
        model(tokens, labels=tokens)
        results["counts"] = model.controller.tokens_per_expert.sum().item()
    metrics = model.update_l1_coef()
    results[rank] = (metrics["remoe/sparsity"], model.l1_coef)
    results[f"empty-{rank}"] = model.update_l1_coef()  # no rank recorded anything: no update anywhere
    results[f"lambda-{rank}"] = model.l1_coef
    dist.destroy_process_group()


def test_a_rank_without_statistics_joins_the_reduction():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_idle_rank_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    expected = 1 - results["counts"] / (32 * 2 * 8)  # rank 0's 32 tokens, 2 MoE layers, 8 experts
    assert results[0][0] == results[1][0] == pytest.approx(expected)
    assert results[0][1] == results[1][1]
    assert results["empty-0"] == results["empty-1"] == {}
    assert results["lambda-0"] == results["lambda-1"] == results[0][1]

"""The ReMoE paper's other routers: `hash`, `expert_choice`, `sparsemixer` and `lory`, each against a reference written
out by hand here (explicit loops over tokens, experts and segments on tiny sizes)."""

import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import remoe
from remoe import ReMoEForCausalLM
from remoe.modeling_remoe import (
    active_experts,
    expert_choice_gates,
    expert_choice_mask,
    random_hash_table,
    sparsemixer_gates,
)

DIMS = dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=1,
    initializer_range=0.2,
)
NEW_ROUTERS = ("hash", "expert_choice", "sparsemixer", "lory")
CACHED_ROUTERS = ("hash", "expert_choice", "sparsemixer")
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")  # the experts implementations that run on CPU


def make_config(router_type: str, **overrides) -> remoe.ReMoEConfig:
    values = dict(DIMS, router_type=router_type)
    if router_type == "lory":
        values["router_segment_length"] = 4
    values.update(overrides)
    return remoe.ReMoEConfig(**values)


def make_model(router_type: str, seed: int = 0, **overrides) -> ReMoEForCausalLM:
    torch.manual_seed(seed)
    return ReMoEForCausalLM(make_config(router_type, **overrides))


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, DIMS["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def hidden(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def expert_ffn(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU on one token x (H,): down_e(silu(gate_e x) * up_e x), gate rows first in gate_up_proj."""
    inter = experts.down_proj.shape[-1]
    w = experts.gate_up_proj[e]
    return experts.down_proj[e] @ (F.silu(w[:inter] @ x) * (w[inter:] @ x))


def merged_ffn(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    inter = down.shape[-1]
    return down @ (F.silu(gate_up[:inter] @ x) * (gate_up[inter:] @ x))


def moe_reference(experts, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(T, H): sum over the nonzero gates of gate * FFN_e(x_t), one token and one expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(gates.shape[1]):
            if gates[t, e] != 0:
                out[t] += gates[t, e] * expert_ffn(experts, e, x[t])
    return out


def greedy_loop(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards of the whole sequence, without a cache."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ----------------------------------------------------------------------------------------------------------------- hash


@pytest.mark.parametrize("k", [1, 2])
def test_hash_table_shape_distinct_experts_and_seeding(k):
    table = make_model("hash", num_experts_per_tok=k).model.layers[0].mlp.router.hash_table
    assert table.shape == (DIMS["vocab_size"], k) and table.dtype == torch.long
    assert int(table.min()) >= 0 and int(table.max()) < DIMS["num_experts"]
    assert all(len(set(row)) == k for row in table.tolist())  # k distinct experts per token id
    assert set(table.flatten().tolist()) == set(range(DIMS["num_experts"]))  # every expert is used
    # Same seed: the same table, whatever the global RNG; both layers share it; another seed: another table.
    again = make_model("hash", seed=123, num_experts_per_tok=k).model.layers[1].mlp.router.hash_table
    assert torch.equal(table, again)
    assert torch.equal(table, random_hash_table(DIMS["vocab_size"], DIMS["num_experts"], k, 0))
    other = make_model("hash", num_experts_per_tok=k, router_hash_seed=7).model.layers[0].mlp.router.hash_table
    assert not torch.equal(table, other)


def test_hash_table_is_saved_and_the_saved_buffer_wins_over_the_config_seed(tmp_path):
    model = make_model("hash", router_hash_seed=3).eval()
    tables = [layer.mlp.router.hash_table.clone() for layer in model.model.layers]
    assert "model.layers.0.mlp.router.hash_table" in model.state_dict()
    model.save_pretrained(tmp_path)
    for seed in (3, 11):
        loaded = ReMoEForCausalLM.from_pretrained(tmp_path, router_hash_seed=seed).eval()
        assert loaded.config.router_hash_seed == seed
        for layer, table in zip(loaded.model.layers, tables, strict=True):
            assert torch.equal(layer.mlp.router.hash_table, table)
        ids = tokens()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert not torch.equal(random_hash_table(DIMS["vocab_size"], DIMS["num_experts"], 1, 11), tables[0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("k", [1, 2])
def test_hash_block_equals_the_sum_over_hashed_experts(k, implementation):
    config = make_config("hash", num_experts_per_tok=k, experts_implementation=implementation)
    block = ReMoEForCausalLM(config).model.layers[0].mlp
    table = block.router.hash_table.tolist()
    ids = tokens(2, 7)
    x = hidden(2, 7, DIMS["hidden_size"])
    with torch.no_grad():
        output = block(x, ids)
        flat_x, flat_ids = x.reshape(-1, DIMS["hidden_size"]), ids.reshape(-1).tolist()
        expected = torch.stack(
            [sum(expert_ffn(block.experts, e, flat_x[t]) for e in table[flat_ids[t]]) for t in range(len(flat_ids))]
        )
    torch.testing.assert_close(output, expected.reshape(x.shape), rtol=1e-5, atol=1e-6)


def test_hash_router_logits_are_the_indicator_of_the_table():
    router = make_model("hash", num_experts_per_tok=2).model.layers[0].mlp.router
    ids = tokens(1, 9).reshape(-1)
    logits, gates = router(hidden(9, DIMS["hidden_size"]), ids)
    expected = torch.zeros(9, DIMS["num_experts"])
    for t, token in enumerate(ids.tolist()):
        for e in router.hash_table[token].tolist():
            expected[t, e] = 1.0
    assert torch.equal(logits, expected) and torch.equal(gates, expected)
    with pytest.raises(ValueError, match="input_ids"):
        router(hidden(9, DIMS["hidden_size"]))
    with pytest.raises(ValueError, match="input_ids"):
        router(hidden(1, DIMS["hidden_size"]), torch.tensor([DIMS["vocab_size"]]))


def test_hash_needs_input_ids():
    model = make_model("hash")
    embeds = model.get_input_embeddings()(tokens())
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=embeds)


@pytest.mark.parametrize("k", [1, 2])
def test_hash_has_no_aux_loss_but_logs_sparsity(k):
    model = make_model("hash", num_experts_per_tok=k).train()
    lambda0 = model.l1_coef
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is None
    expected_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, DIMS["vocab_size"]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected_lm)
    out.loss.backward()
    metrics = model.update_l1_coef()
    assert metrics["remoe/sparsity"] == 1 - k / DIMS["num_experts"]
    assert metrics["remoe/experts_per_token"] == pytest.approx(k)
    assert metrics["remoe/l1_coef"] == lambda0  # no L1 controller for hash routing
    assert metrics["remoe/loss_reg"] == 0.0


# ------------------------------------------------------------------------------------------------------- expert choice


def expert_choice_reference(probs: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each expert sorts the tokens by its score and keeps the first `capacity`, gated by that score."""
    num_tokens, num_experts = probs.shape
    gates = torch.zeros_like(probs)
    for e in range(num_experts):
        order = sorted(range(num_tokens), key=lambda t: -float(probs[t, e]))
        for t in order[:capacity]:
            gates[t, e] = probs[t, e]
    return gates


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "capacity_factor", "capacity"),
    [
        (20, 4, 1, 1.0, 5),
        (20, 4, 1, 1.3, 7),  # ceil(6.5)
        (10, 4, 1, 1.0, 3),  # ceil(2.5)
        (10, 4, 2, 1.0, 5),
        (9, 8, 2, 0.5, 2),  # ceil(1.125)
        (6, 4, 2, 10.0, 6),  # 30, capped at T
        (1, 4, 1, 1.0, 1),
    ],
)
def test_expert_choice_gates_equal_a_hand_loop(num_tokens, num_experts, k, capacity_factor, capacity):
    assert capacity == min(num_tokens, math.ceil(capacity_factor * k * num_tokens / num_experts))
    probs = torch.softmax(hidden(num_tokens, num_experts, seed=num_tokens + 3 * k), dim=-1)
    gates = expert_choice_gates(probs, k, capacity_factor)
    expected = expert_choice_reference(probs, capacity)
    assert torch.equal(gates, expected)
    assert ((gates > 0).sum(dim=0) == capacity).all()  # every expert takes exactly C tokens
    mask = expert_choice_mask(torch.log(probs) + 1.5, k, capacity_factor)  # logits up to a constant
    assert torch.equal(mask, expected > 0)
    if capacity == num_tokens:
        assert torch.equal(gates, probs)


# C = ceil(capacity_factor * k * T / E) exactly: in floats 1.1 * 3000 / 4 = 825.0000000000001 would give 826.
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "capacity_factor", "capacity"),
    [(3000, 4, 1, 1.1, 825), (10, 3, 3, 0.1, 1)],
)
def test_expert_choice_capacity_is_the_exact_ceiling(num_tokens, num_experts, k, capacity_factor, capacity):
    assert capacity == math.ceil(Fraction(str(capacity_factor)) * k * num_tokens / num_experts)
    probs = torch.softmax(hidden(num_tokens, num_experts, seed=7), dim=-1)
    taken = (expert_choice_gates(probs, k, capacity_factor) > 0).sum(dim=0)
    assert taken.tolist() == [capacity] * num_experts


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_expert_choice_block_in_training_equals_the_hand_reference(implementation):
    config = make_config("expert_choice", router_capacity_factor=1.3, experts_implementation=implementation)
    block = ReMoEForCausalLM(config).model.layers[0].mlp.train()
    x = hidden(2, 10, DIMS["hidden_size"])
    flat = x.reshape(-1, DIMS["hidden_size"])
    with torch.no_grad():
        output = block(x)
        probs = torch.softmax(flat @ block.router.weight.t(), dim=-1)
        gates = expert_choice_reference(probs, math.ceil(1.3 * 20 / 4))
        expected = moe_reference(block.experts, flat, gates)
    assert (gates > 0).sum(dim=1).unique().numel() > 1  # tokens get different numbers of experts
    torch.testing.assert_close(output, expected.reshape(x.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_expert_choice_at_eval_is_per_token_top_k(k):
    block = make_model("expert_choice", num_experts_per_tok=k).model.layers[0].mlp.eval()
    x = hidden(2, 9, DIMS["hidden_size"])
    flat = x.reshape(-1, DIMS["hidden_size"])
    with torch.no_grad():
        output = block(x)
        logits, router_gates = block.router(flat)
        probs = torch.softmax(flat @ block.router.weight.t(), dim=-1)
        gates = torch.zeros_like(probs)
        for t in range(probs.shape[0]):
            for e in sorted(range(DIMS["num_experts"]), key=lambda e: -float(probs[t, e]))[:k]:
                gates[t, e] = probs[t, e]  # not renormalised
        expected = moe_reference(block.experts, flat, gates)
    torch.testing.assert_close(router_gates, gates)
    torch.testing.assert_close(output, expected.reshape(x.shape), rtol=1e-5, atol=1e-6)
    config = make_config("expert_choice", num_experts_per_tok=k)
    assert torch.equal(active_experts(logits, config), gates > 0)


def test_expert_choice_training_statistics_are_balanced():
    model = make_model("expert_choice", router_capacity_factor=1.3).train()
    ids = tokens(2, 10)
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is None
    out.loss.backward()
    metrics = model.update_l1_coef()
    capacity = math.ceil(1.3 * 1 * 20 / 4)  # 7 of the 20 tokens of the batch
    assert metrics["remoe/sparsity"] == pytest.approx(1 - capacity * 4 / (20 * 4), abs=1e-12)
    for layer in range(DIMS["num_hidden_layers"]):
        assert metrics[f"remoe/max_load/layer_{layer}"] == pytest.approx(1.0, abs=1e-12)
        assert metrics[f"remoe/sparsity/layer_{layer}"] == pytest.approx(1 - capacity / 20, abs=1e-12)


# --------------------------------------------------------------------------------------------------------- sparsemixer


def sparsemixer_round(scores: list[float], excluded: list[int], eps: float) -> tuple[list[float], int]:
    """One round by hand: the softmax over the experts not excluded and within `2 eps` (relative) of the best one
    (0 elsewhere), and the best expert."""
    rest = [e for e in range(len(scores)) if e not in excluded]
    best = max(scores[e] for e in rest)
    kept = [e for e in rest if (best - scores[e]) / max(abs(scores[e]), best) <= 2 * eps]
    total = sum(math.exp(scores[e]) for e in kept)
    probs = [math.exp(scores[e]) / total if e in kept else 0.0 for e in range(len(scores))]
    return probs, max(rest, key=lambda e: scores[e])


def sparsemixer_eval_reference(logits: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    gates = torch.zeros(logits.shape, dtype=torch.float64)
    for t, scores in enumerate(logits.double().tolist()):
        chosen = []
        for _ in range(k):
            probs, best = sparsemixer_round(scores, chosen, eps)
            gates[t, best] = probs[best]
            chosen.append(best)
    return gates


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparsemixer_eval_gates_equal_a_hand_computation(k):
    crafted = torch.tensor(
        [
            [1.0, 0.9, 0.85, -1.0],  # eps 0.1: round 1 keeps 3 experts, round 2 keeps 2
            [2.0, -0.5, 1.7, 1.95],
            [-0.3, -0.31, -2.0, -0.305],  # all negative: the relative gap uses |score|
            [0.5, 0.1, 0.2, 0.45],
        ]
    )
    logits = torch.cat([crafted, hidden(60, 4, seed=5)])
    gates = sparsemixer_gates(logits, k, 0.1, training=False)
    expected = sparsemixer_eval_reference(logits, k, 0.1)
    torch.testing.assert_close(gates.double(), expected, rtol=1e-6, atol=1e-7)
    assert ((gates > 0).sum(dim=1) == k).all()
    assert torch.equal(gates > 0, active_experts(logits, make_config("sparsemixer", num_experts_per_tok=k)))
    # The crafted rows by hand: masking changes the probabilities, nothing is renormalised over the k rounds.
    assert gates[0, 0] == pytest.approx(math.exp(1) / (math.exp(1) + math.exp(0.9) + math.exp(0.85)), rel=1e-6)
    if k >= 2:
        assert gates[0, 1] == pytest.approx(math.exp(0.9) / (math.exp(0.9) + math.exp(0.85)), rel=1e-6)
        assert gates[0].sum() != pytest.approx(1.0)


def test_sparsemixer_router_at_eval_uses_its_gates():
    block = make_model("sparsemixer", num_experts_per_tok=2, router_jitter_eps=0.5).model.layers[0].mlp.eval()
    x = hidden(2, 6, DIMS["hidden_size"])
    flat = x.reshape(-1, DIMS["hidden_size"])
    with torch.no_grad():
        logits, gates = block.router(flat)
        torch.testing.assert_close(logits, flat @ block.router.weight.t())
        expected_gates = sparsemixer_eval_reference(logits, 2, 0.5).float()
        torch.testing.assert_close(gates, expected_gates, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            block(x), moe_reference(block.experts, flat, expected_gates).reshape(x.shape), rtol=1e-5, atol=1e-6
        )


def recover_rounds(scores: list[float], gate_row: list[float], eps: float) -> list[tuple]:
    """The (expert, p, round probabilities, round's best expert) of each training round, from the forward's nonzero gates: the order of
    the chosen experts is the one whose gates are p or p / 3 (p always when the sample is the round's best)."""
    chosen = [e for e, g in enumerate(gate_row) if g != 0]
    found = []
    for order in itertools.permutations(chosen):
        rounds, ok = [], True
        for r, e in enumerate(order):
            probs, best = sparsemixer_round(scores, list(order[:r]), eps)
            p, g = probs[e], gate_row[e]
            full, third = math.isclose(g, p, rel_tol=1e-5), math.isclose(g, p / 3, rel_tol=1e-5)
            if p == 0 or not (full or (third and e != best)):
                ok = False
                break
            rounds.append((e, p, probs, best))
        if ok:
            found.append(rounds)
    assert found, f"no order of {chosen} explains the gates {gate_row}"
    return found[0]


@pytest.mark.parametrize("k", [1, 2])
def test_sparsemixer_backward_is_the_midpoint_estimate(k):
    eps = 0.3
    logits = hidden(40, 4, seed=9).requires_grad_(True)
    weights = hidden(40, 4, seed=10)
    torch.manual_seed(1234)
    gates = sparsemixer_gates(logits, k, eps, training=True)
    assert ((gates > 0).sum(dim=1) == k).all()
    (gates * weights).sum().backward()
    expected = torch.zeros(40, 4, dtype=torch.float64)
    some_not_best = False
    for t, (scores, gate_row) in enumerate(zip(logits.tolist(), gates.tolist(), strict=True)):
        for e, p, probs, best in recover_rounds(scores, gate_row, eps):
            # grad * p * (onehot - probs): omega is not differentiated.
            for j in range(4):
                expected[t, j] += float(weights[t, e]) * p * ((j == e) - probs[j])
            some_not_best |= e != best
    assert some_not_best  # the sampling picked a non-best expert somewhere
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_sparsemixer_sampling_and_omega_statistics():
    torch.manual_seed(0)
    eps = 1.0  # a wide window: most experts stay candidates
    logits = hidden(20000, 4, seed=11)
    gates = sparsemixer_gates(logits, 1, eps, training=True)
    chosen = gates.argmax(dim=-1)
    assert ((gates > 0).sum(dim=1) == 1).all()
    # The masked softmax, vectorised by hand.
    best = logits.max(dim=-1, keepdim=True).values
    far = (best - logits) / torch.maximum(logits.abs(), best) > 2 * eps
    probs = torch.softmax(logits.masked_fill(far, float("-inf")), dim=-1)
    p = probs.gather(1, chosen[:, None]).squeeze(1)
    ratio = gates.gather(1, chosen[:, None]).squeeze(1) / p
    is_best = chosen == logits.argmax(dim=-1)
    assert torch.allclose(ratio[is_best], torch.ones(())), "the best expert always keeps omega = 1"
    not_best = ratio[~is_best]
    assert len(not_best) > 3000
    full = torch.isclose(not_best, torch.tensor(1.0))
    third = torch.isclose(not_best, torch.tensor(1 / 3))
    assert bool((full | third).all())
    assert full.float().mean().item() == pytest.approx(0.25, abs=0.03)
    # Gumbel-max: the choice frequency of each expert is its mean masked probability.
    frequency = F.one_hot(chosen, 4).float().mean(dim=0)
    torch.testing.assert_close(frequency, probs.mean(dim=0), rtol=0, atol=0.015)
    assert not bool(far.gather(1, chosen[:, None]).any())  # never a masked expert


def test_sparsemixer_training_adds_the_switch_loss():
    model = make_model("sparsemixer", num_experts_per_tok=2, router_aux_loss_coef=0.1).train()
    assert model.config.uses_balancing_loss
    ids = tokens()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == DIMS["num_hidden_layers"]
    expected_aux = 0.0
    for logits in out.router_logits:
        num_tokens, num_experts = logits.shape
        top = torch.topk(logits.detach(), 2, dim=-1).indices
        fraction = torch.stack([(top == e).sum() for e in range(num_experts)]).float() / (num_tokens * 2)
        mean_probs = torch.softmax(logits, dim=-1).mean(dim=0)
        expected_aux = expected_aux + num_experts * (fraction * mean_probs).sum()  # summed over the layers
    torch.testing.assert_close(out.aux_loss, expected_aux)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, DIMS["vocab_size"]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm + 0.1 * expected_aux)
    out.loss.backward()
    metrics = model.update_l1_coef()
    assert metrics["remoe/loss_reg"] == pytest.approx(0.1 * expected_aux.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------- lory


def lory_reference(block, x: torch.Tensor, length: int) -> torch.Tensor:
    """Per batch row and segment: the experts merged with softmax(W mean(previous segment)) (the first segment: its
    own mean, its weights detached), then one SwiGLU FFN."""
    batch, seq, _ = x.shape
    weight, experts = block.router.weight, block.experts
    num_experts = weight.shape[0]
    out = torch.zeros_like(x)
    starts = list(range(0, seq, length))
    for b in range(batch):
        means = [x[b, s : s + length].mean(dim=0) for s in starts]  # a partial segment: its real tokens only
        for j, s in enumerate(starts):
            p = torch.softmax(weight @ means[max(j - 1, 0)], dim=-1)
            if j == 0:
                p = p.detach()
            gate_up = sum(p[e] * experts.gate_up_proj[e] for e in range(num_experts))
            down = sum(p[e] * experts.down_proj[e] for e in range(num_experts))
            for t in range(s, min(s + length, seq)):
                out[b, t] = merged_ffn(gate_up, down, x[b, t])
    return out


def lory_block(**overrides):
    return make_model("lory", **overrides).model.layers[0].mlp


@pytest.mark.parametrize("seq", [3, 4, 11, 12])
def test_lory_block_equals_a_loop_over_rows_and_segments(seq):
    block = lory_block()
    x = hidden(2, seq, DIMS["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(block(x), lory_reference(block, x, 4), rtol=1e-5, atol=1e-6)


def test_lory_router_gradient_matches_the_reference_and_skips_the_first_segment():
    block = lory_block()
    x = hidden(2, 11, DIMS["hidden_size"])
    target = hidden(2, 11, DIMS["hidden_size"], seed=4)
    (block(x) * target).sum().backward()
    grads = [p.grad.clone() for p in (block.router.weight, block.experts.gate_up_proj, block.experts.down_proj)]
    block.zero_grad()
    (lory_reference(block, x, 4) * target).sum().backward()
    for grad, p in zip(grads, (block.router.weight, block.experts.gate_up_proj, block.experts.down_proj), strict=True):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)
    assert grads[0].abs().max() > 0
    # A loss on the first segment only reaches the router through nothing: its routing weights are detached.
    block.zero_grad()
    (block(x)[:, :4] * target[:, :4]).sum().backward()
    assert block.router.weight.grad is None or not block.router.weight.grad.any()
    assert block.experts.gate_up_proj.grad.abs().max() > 0
    # A sequence of exactly one segment (full or partial) gives the router no gradient at all.
    for seq in (4, 3):
        block.zero_grad()
        (block(hidden(2, seq, DIMS["hidden_size"])) ** 2).sum().backward()
        assert block.router.weight.grad is None or not block.router.weight.grad.any()


def test_lory_block_is_causal_across_segments():
    block = lory_block()
    x = hidden(1, 16, DIMS["hidden_size"])
    changed = x.clone()
    changed[0, 9] += 3.0  # a token of segment 2
    with torch.no_grad():
        before, after = block(x), block(changed)
    assert torch.equal(before[:, :8], after[:, :8])  # segments 0 and 1
    assert not torch.allclose(before[:, 8:12], after[:, 8:12])  # segment 2 itself
    assert not torch.allclose(before[:, 12:], after[:, 12:])  # segment 3 is routed by segment 2
    # Inside the first segment, routing by its own mean sees later tokens (Lory's documented exception).
    changed = x.clone()
    changed[0, 3] += 3.0
    with torch.no_grad():
        assert not torch.allclose(block(x)[:, :3], block(changed)[:, :3])


def test_lory_model_is_causal_across_segments():
    model = make_model("lory").eval()
    ids = tokens(1, 16)
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % DIMS["vocab_size"]
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_lory_config_constraints_and_segment_length():
    for field, value in (("num_experts_per_tok", 2), ("granularity", 2)):
        with pytest.raises(ValueError, match=field):
            make_config("lory", **{field: value})
    config = make_config("lory", router_segment_length=None)
    assert config.segment_length == 16  # min(256, 64 // 4)
    assert config.use_cache is False
    assert make_config("lory", router_segment_length=None, max_position_embeddings=4096).segment_length == 256
    assert make_config("lory", router_segment_length=None, max_position_embeddings=200).segment_length == 50
    assert make_config("lory", router_segment_length=None, max_position_embeddings=3).segment_length == 1
    assert make_config("lory", router_segment_length=7).segment_length == 7
    assert ReMoEForCausalLM(config).model.layers[0].mlp.segment_length == 16


def test_lory_refuses_a_kv_cache():
    from transformers.cache_utils import DynamicCache

    model = make_model("lory").eval()
    ids = tokens(1, 6)
    with pytest.raises(ValueError, match="cache"):
        model(input_ids=ids, use_cache=True)
    with pytest.raises(ValueError, match="cache"):
        model(input_ids=ids, **{remoe.modeling_remoe.CACHE_NAME: DynamicCache(config=model.config)})


def test_lory_generate_equals_a_greedy_loop_of_full_forwards():
    model = make_model("lory").eval()
    ids = tokens(1, 5)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 13)
    assert torch.equal(generated, greedy_loop(model, ids, 8))


# ----------------------------------------------------------------------------------------------------- all four routers


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("router_capacity_factor", 0),
        ("router_capacity_factor", -1.0),
        ("router_capacity_factor", float("inf")),
        ("router_jitter_eps", 0),
        ("router_jitter_eps", -0.01),
        ("router_jitter_eps", float("nan")),
        ("router_segment_length", 0),
        ("router_segment_length", -4),
        ("router_hash_seed", -1),
    ],
)
@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_config_validation_names_the_field(router_type, field, value):
    with pytest.raises(ValueError, match=field):
        make_config(router_type, **{field: value})


def test_config_validation_of_from_pretrained_overrides(tmp_path):
    make_config("expert_choice").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="router_capacity_factor"):
        remoe.ReMoEConfig.from_pretrained(tmp_path, router_capacity_factor=0.0)
    make_config("lory").save_pretrained(tmp_path / "lory")
    assert remoe.ReMoEConfig.from_pretrained(tmp_path / "lory").use_cache is False
    with pytest.raises(ValueError, match="cache"):
        remoe.ReMoEConfig.from_pretrained(tmp_path / "lory", use_cache=True)


def test_balancing_loss_flags():
    assert make_config("sparsemixer").uses_balancing_loss
    for router_type in ("hash", "expert_choice", "lory"):
        config = make_config(router_type)
        assert not config.uses_balancing_loss and not config.uses_l1_controller


@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_save_and_load_give_identical_logits(router_type, tmp_path):
    model = make_model(router_type).eval()
    model.save_pretrained(tmp_path)
    loaded = ReMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.router_type == router_type
    assert torch.equal(
        torch.cat([p.flatten() for p in loaded.state_dict().values() if p.is_floating_point()]),
        torch.cat([p.flatten() for p in model.state_dict().values() if p.is_floating_point()]),
    )
    ids = tokens(2, 11)
    with torch.no_grad():
        # Bit-equal weights; the logits agree to float rounding (the reloaded tensors' memory can take other kernels'
        # paths: the same ~4e-7 appears for router_type="topk").
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router_type", CACHED_ROUTERS)
def test_cached_generation_equals_uncached(router_type):
    model = make_model(router_type, num_experts_per_tok=2).eval()
    ids = tokens(2, 5)
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_loop(model, ids, 8))


# Padding must not reach the real tokens: for Lory, pads must stay out of the segment means and (left padding) must not
# shift the segment boundaries; a row shorter than one segment is routed by its own real tokens only.
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_padding_does_not_change_the_real_tokens_logits(router_type, side):
    model = make_model(router_type).eval()
    long, short = tokens(1, 7, seed=3), tokens(1, 3, seed=4)
    pads = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.ones(2, 7, dtype=torch.long)
    if side == "left":
        row, real = torch.cat([pads, short], dim=1), slice(4, 7)
        mask[1, :4] = 0
    else:
        row, real = torch.cat([short, pads], dim=1), slice(0, 3)
        mask[1, 3:] = 0
    with torch.no_grad():
        batched = model(input_ids=torch.cat([long, row]), attention_mask=mask).logits
        alone = model(input_ids=short).logits
        torch.testing.assert_close(batched[0], model(input_ids=long).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1, real], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_training_step_gives_every_router_parameter_a_finite_gradient(router_type):
    model = make_model(router_type).train()
    ids = tokens(2, 12)
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert (out.aux_loss is not None) == (router_type == "sparsemixer")
    out.loss.backward()
    router_parameters = [(name, p) for name, p in model.named_parameters() if ".router." in name]
    if router_type == "hash":
        assert router_parameters == []
    else:
        assert len(router_parameters) == DIMS["num_hidden_layers"]
        for name, parameter in router_parameters:
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().max() > 0, name
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert "remoe/sparsity" in model.update_l1_coef()


@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_gradient_checkpointing_gives_the_same_gradients(router_type):
    """SparseMixer samples in training: the recomputed forward must draw the same experts (preserved RNG state)."""
    grads = []
    for checkpointing in (False, True):
        model = make_model(router_type).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable()
        ids = tokens(2, 12)
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("moe_layer_freq", [1, 2])
@pytest.mark.parametrize("router_type", NEW_ROUTERS)
def test_output_router_logits_gives_one_tokens_by_experts_tensor_per_moe_layer(router_type, moe_layer_freq):
    model = make_model(router_type, moe_layer_freq=moe_layer_freq).eval()
    ids = tokens(2, 9)
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == DIMS["num_hidden_layers"] // moe_layer_freq
    for logits in out.router_logits:
        assert logits.shape == (18, DIMS["num_experts"])
        assert torch.isfinite(logits).all()
    with torch.no_grad():
        assert model(input_ids=ids).router_logits is None


def gates_of_layer_0(model, ids: torch.Tensor) -> torch.Tensor:
    block = model.model.layers[0].mlp
    captured = []
    handle = block.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    flat = captured[0].reshape(-1, DIMS["hidden_size"])
    with torch.no_grad():
        logits, gates = block.router(flat)
    torch.testing.assert_close(logits, flat @ block.router.weight.t())
    return gates


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("router_type", CACHED_ROUTERS)
def test_active_experts_at_eval_are_the_k_experts_the_block_uses(router_type, k):
    model = make_model(router_type, num_experts_per_tok=k).eval()
    ids = tokens(2, 9)
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    block = model.model.layers[0].mlp
    active = active_experts(out.router_logits[0], model.config)
    assert active.shape == (18, DIMS["num_experts"]) and active.dtype == torch.bool
    assert (active.sum(dim=-1) == k).all()
    if router_type == "hash":
        table = block.router.hash_table[ids.reshape(-1)]
        expected = torch.zeros_like(active).scatter_(1, table, True)
        assert torch.equal(active, expected)
    else:
        # The gates the router gives the same layer's inputs, captured on the way in.
        assert torch.equal(active, gates_of_layer_0(model, ids) > 0)

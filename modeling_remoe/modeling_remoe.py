# Copyright 2026 The remoe authors. Licensed under the Apache License, Version 2.0.
"""ReMoE: a LLaMA-style decoder with ReLU-routed (or TopK-routed, or dense) Mixture-of-Experts FFNs.

This file is also shipped as Hub remote code: it imports only torch, transformers and its sibling configuration file.
The experts run through Transformers' experts implementations (`eager`, `batched_mm`, `grouped_mm`, ...); the
`remoe.kernels` package is optional and adds `triton`.
"""

import dataclasses
import math
import warnings
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_remoe import ReMoEConfig, experts_implementations

# Transformers' experts functions (`batched_mm`, `sonicmoe`, ...), ReMoE's `grouped_mm` (Transformers' function with a
# CPU decoding shortcut, below), plus the Triton kernels when `remoe` is installed.
REMOE_EXPERTS_FUNCTIONS = ExpertsInterface()
try:
    from remoe.kernels import IMPLEMENTATIONS as _KERNEL_IMPLEMENTATIONS
    from remoe.kernels import triton_experts_forward

    if "triton" in _KERNEL_IMPLEMENTATIONS:
        REMOE_EXPERTS_FUNCTIONS["triton"] = triton_experts_forward
except ImportError:  # remote code without the `remoe` package: Transformers' implementations only
    pass

# Transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`; older releases
# pass and read `past_key_values`. Everything that crosses into Transformers uses the installed release's name.
CACHE_NAME = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(MoeModelOutputWithPast)} else "past_key_values"
)

logger = logging.get_logger(__name__)


class ReMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class ReMoERotaryEmbedding(nn.Module):
    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: ReMoEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class ReMoEAttention(nn.Module):
    """Grouped-query attention with RoPE, dispatched through `ALL_ATTENTION_FUNCTIONS`."""

    def __init__(self, config: ReMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.o_proj.writes_residual = True  # for `scaled_output_init`

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class ReMoEMLP(nn.Module):
    """Dense SwiGLU FFN (Llama's `LlamaMLP` layout)."""

    def __init__(self, config: ReMoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.down_proj.writes_residual = True  # for `scaled_output_init`
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class ReMoERouter(nn.Module):
    """Token-to-expert routing: `forward(hidden_states (T, H), input_ids (T,) | None)` -> router logits `(T, E)` (what
    `output_router_logits` returns and every routing statistic reads) and gates `(T, E)`, mostly zero.

    - `relu` (ReMoE): gates = ReLU(x W^T).
    - `topk`: gates = TopK(Softmax(x W^T), k), renormalised to sum 1 only with `router_renormalize` (Mixtral's
      convention; the ReMoE paper's TopK baseline keeps the softmax values).
    - `sparsemixer`: GRIN's SparseMixer-v2 top-k (`sparsemixer_gates`).
    - `expert_choice`: in training every expert takes its top-C tokens of the batch by softmax score
      (`expert_choice_gates`); at inference every token takes its top-k experts by the same scores.
    - `hash`: no parameters: token id v goes to the k experts `hash_table[v]` with gate 1; the logits are the 0/1
      indicator of those experts.
    - `lory`: the rows are routing representations (the previous segment's mean, `ReMoELoryMoeBlock`); the gates are
      the softmax over all experts, used to merge the experts' parameters.
    """

    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.router_type = config.router_type
        self.num_experts = config.num_routed_experts
        self.top_k = config.routed_top_k
        self.renormalize = config.router_renormalize
        self.sampling = config.router_sampling
        self.capacity_factor = config.router_capacity_factor
        self.jitter_eps = config.router_jitter_eps
        if self.router_type == "hash":
            self.hash_seed = config.router_hash_seed
            self.register_buffer("hash_table", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def forward(
        self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H) -> router logits (T, E) and gates (T, E), mostly zero."""
        if self.router_type == "hash":
            return hash_gates(self.hash_table, input_ids, self.num_experts, hidden_states.dtype)
        router_logits = F.linear(hidden_states, self.weight)
        if self.router_type == "relu":
            return router_logits, F.relu(router_logits)
        if self.router_type == "sparsemixer":
            gates = sparsemixer_gates(router_logits, self.top_k, self.jitter_eps, self.training)
            return router_logits, gates.to(hidden_states.dtype)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        if self.router_type == "lory":
            return router_logits, probs.to(hidden_states.dtype)
        if self.router_type == "expert_choice" and self.training:
            return router_logits, expert_choice_gates(probs, self.top_k, self.capacity_factor).to(hidden_states.dtype)
        if self.sampling and self.training:
            # Gumbel-top-k: k experts drawn from the softmax without replacement; the gates are straight-through
            # (forward: the kept probabilities, renormalised if asked; backward: as the unnormalised probabilities).
            gumbel = -torch.empty_like(probs).exponential_().log()
            top_indices = torch.topk(probs.log() + gumbel, self.top_k, dim=-1).indices
            top_probs = probs.gather(1, top_indices)
            kept = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.renormalize else top_probs
            top_values = kept.detach() + top_probs - top_probs.detach()
        else:
            top_values, top_indices = torch.topk(probs, self.top_k, dim=-1)
            if self.renormalize:
                top_values = top_values / top_values.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(1, top_indices, top_values)
        return router_logits, gates.to(hidden_states.dtype)


def random_hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Hash Layers' random hash: `(vocab_size, top_k)` expert ids, k distinct experts per token id, drawn uniformly
    with a generator seeded by `seed` (so a config rebuilds the same table; the saved buffer is what counts)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(vocab_size, num_experts, generator=generator).argsort(dim=-1)[:, :top_k]


def hash_gates(
    hash_table: torch.Tensor, input_ids: torch.Tensor | None, num_experts: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing of token ids `(T,)`: the 0/1 indicator `(T, E)` of each token's `hash_table` experts (float32, as
    router logits) and the gates, the same indicator: the experts' outputs are added unweighted (Hash Layers' gate
    1; with k > 1 the sum over the hashed experts, as MultiHash sums its hashed segments)."""
    if input_ids is None:
        raise ValueError(
            "router_type='hash' routes each token by its id: pass input_ids (inputs_embeds alone cannot be hashed)"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= hash_table.shape[0]):
        raise ValueError(f"input_ids must lie in [0, {hash_table.shape[0]}) for the hash router's table")
    experts = hash_table[input_ids.reshape(-1)]
    indicator = torch.zeros(experts.shape[0], num_experts, device=experts.device, dtype=torch.float32)
    indicator.scatter_(1, experts, 1.0)
    return indicator, indicator.to(dtype)


def expert_choice_gates(probs: torch.Tensor, top_k: int, capacity_factor: float) -> torch.Tensor:
    """Expert Choice routing (Zhou et al. 2022) over the T rows of `probs (T, E)` (the token-to-expert softmax): every
    expert takes the `C = ceil(capacity_factor * k * T / E)` rows with the highest score (at most T) and gates them by
    that score; a row may get any number of experts, zero included."""
    num_tokens, num_experts = probs.shape
    # Exact arithmetic: in floats, 1.1 * 3000 / 4 = 825.0000000000001 would round up to 826.
    capacity = min(num_tokens, math.ceil(Fraction(str(capacity_factor)) * top_k * num_tokens / num_experts))
    if capacity == 0:
        return torch.zeros_like(probs)
    top_scores, top_tokens = torch.topk(probs.t(), capacity, dim=-1)  # (E, C)
    return torch.zeros_like(probs.t()).scatter(1, top_tokens, top_scores).t()


def expert_choice_mask(router_logits: torch.Tensor, top_k: int, capacity_factor: float) -> torch.Tensor:
    """The `(T, E)` booleans of `expert_choice_gates` recomputed from router logits (routing statistics)."""
    probs = F.softmax(router_logits.float(), dim=-1)
    return expert_choice_gates(probs, top_k, capacity_factor) > 0


class SparseMixerGate(torch.autograd.Function):
    """SparseMixer-v2's gate of one sampled expert: forward `omega * p` (p the masked softmax probability of the
    sampled expert, omega in {1, 1/3}); backward passes `grad * dp/dscores = grad * p * (onehot - probs)` to the
    scores (the midpoint-method estimate of the discrete choice's gradient; omega is not differentiated)."""

    @staticmethod
    def forward(ctx, scores, chosen_prob, chosen, probs, omega):
        ctx.save_for_backward(chosen_prob, chosen, probs)
        return chosen_prob * omega

    @staticmethod
    def backward(ctx, grad_output):
        chosen_prob, chosen, probs = ctx.saved_tensors
        weighted = grad_output * chosen_prob  # (T, 1)
        grad_scores = (-probs * weighted).scatter_add(-1, chosen, weighted)
        return grad_scores, None, None, None, None


def sparsemixer_gates(router_logits: torch.Tensor, top_k: int, jitter_eps: float, training: bool) -> torch.Tensor:
    """GRIN's SparseMixer-v2 (Liu et al. 2024), generalised from its top-2 to k rounds. Round r: among the experts not
    chosen yet, mask those whose score is more than `2 * jitter_eps` (relative to max(|score|, best)) below the best;
    choose one from the softmax of the rest (Gumbel sampling in training, the best at inference); its gate is that
    softmax probability p, in training times omega = 1 when the sample is the best expert or with probability 1/4,
    else 1/3, with `SparseMixerGate`'s gradient. Returns gates `(T, E)` with k nonzeros per row."""
    scores = router_logits.float()
    remaining = scores
    gates = torch.zeros_like(scores)
    for _ in range(top_k):
        with torch.no_grad():
            best, best_index = remaining.max(dim=-1, keepdim=True)
            far = (best - scores) / scores.abs().clamp(min=best) > 2 * jitter_eps
        masked = remaining.masked_fill(far, float("-inf"))
        if training:
            gumbel = -torch.empty_like(masked).exponential_().log()
            chosen = (masked.detach() + gumbel).argmax(dim=-1, keepdim=True)
        else:
            chosen = best_index
        probs = F.softmax(masked, dim=-1)
        chosen_prob = probs.gather(-1, chosen)
        if training:
            with torch.no_grad():
                keep_full = (chosen == best_index) | (torch.rand_like(chosen_prob) > 0.75)
                omega = torch.where(keep_full, 1.0, 1.0 / 3.0)
            gate = SparseMixerGate.apply(scores, chosen_prob.detach(), chosen, probs.detach(), omega)
        else:
            gate = chosen_prob
        gates = gates.scatter(-1, chosen, gate)
        remaining = remaining.scatter(-1, chosen, float("-inf"))
    return gates


# On CPU, MKL multiplies a block of 2-7 rows by a large weight (at least `_LARGE_MATRIX` elements, whose reading
# bounds the product) about 1.5x faster as `weight @ rows.T` than as `rows @ weight.T`; for 1 row, for 8 or more, and
# for small weights (bound by per-call overhead) the plain product is as fast or faster (measured).
_FEW_ROWS = range(2, 8)
_LARGE_MATRIX = 2**19


def _block_times_weight(block: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """`out = block @ weight.T` (`block (n, in)`, `weight (out, in)`) with `torch.mm`, as `(weight @ block.T).T` for
    a few rows and a large weight on CPU: the experts' product (`eager_experts_forward` takes another)."""
    if block.device.type == "cpu" and len(block) in _FEW_ROWS and weight.numel() >= _LARGE_MATRIX:
        out.copy_(torch.mm(weight, block.t()).t())
    else:
        torch.mm(block, weight.t(), out=out)


LinearInto = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _rows_times_experts(
    rows: torch.Tensor, weight: torch.Tensor, counts: list[int], linear_into: LinearInto = _block_times_weight
) -> torch.Tensor:
    """`(P, out)`: each expert's block of `rows` (grouped by expert, `counts[e]` rows) times `weight[e].T`, one
    `linear_into(block, weight, out)` product per expert with rows."""
    output = rows.new_empty(rows.shape[0], weight.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            linear_into(rows[start : start + count], weight[expert], output[start : start + count])
            start += count
    return output


class ExpertsLinear(torch.autograd.Function):
    """`rows (P, in)` grouped by expert (`counts[e]` rows for expert e, in order) times `weight (E, out, in)`:
    `(P, out)`, one `linear_into` product per expert with rows and none for the others. Backward writes every
    expert's weight gradient into one `(E, out, in)` buffer: no buffer of its own per expert, no stacking
    afterwards, and only the experts without rows are zero-filled."""

    @staticmethod
    def forward(
        ctx, rows: torch.Tensor, weight: torch.Tensor, counts: list[int], linear_into: LinearInto = _block_times_weight
    ) -> torch.Tensor:
        output = _rows_times_experts(rows, weight, counts, linear_into)
        ctx.save_for_backward(rows, weight)
        ctx.counts, ctx.linear_into = counts, linear_into
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        rows, weight = ctx.saved_tensors
        linear_into = ctx.linear_into
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for expert, count in enumerate(ctx.counts):
            if count:
                grad = grad_output[start : start + count]
                if grad_rows is not None:
                    linear_into(grad, weight[expert].t(), grad_rows[start : start + count])
                if grad_weight is not None:
                    linear_into(grad.t(), rows[start : start + count].t(), grad_weight[expert])
                start += count
            elif grad_weight is not None:  # only the experts without rows are zeroed, not the whole buffer first
                grad_weight[expert].zero_()
        if grad_weight is not None and len(ctx.counts) < len(grad_weight):
            grad_weight[len(ctx.counts) :].zero_()
        return grad_rows, grad_weight, None, None


def _experts_linear(
    rows: torch.Tensor, weight: torch.Tensor, counts: list[int], linear_into: LinearInto = _block_times_weight
) -> torch.Tensor:
    """`ExpertsLinear` with the operands `F.linear` would compute with under autocast (its `torch.mm(out=...)` calls
    have no autocast rule); without gradients, its forward alone."""
    device_type = rows.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        rows, weight = (t.to(dtype) if t.dtype != torch.float64 else t for t in (rows, weight))
    elif rows.dtype != weight.dtype:
        rows = rows.to(weight.dtype)
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        return ExpertsLinear.apply(rows, weight, counts, linear_into)
    return _rows_times_experts(rows, weight, counts, linear_into)


def eager_experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    linear_into: LinearInto = _block_times_weight,
) -> torch.Tensor:
    """The `eager` experts: a loop over the experts that received at least one row, with Transformers' experts
    contract (rows `(R, H)` routed to `top_k_index (R, K)` with `top_k_weights (R, K)`; an index of `num_experts` or
    more, expert parallelism's sentinel, contributes nothing). `module` holds `gate_up_proj (E, 2I, H)` and
    `down_proj (E, H, I)`.

    The (row, expert) pairs are sorted by expert once (not at all when they already are, as the ReLU pairs of
    `experts_over_active_pairs`) and gathered once; `ExpertsLinear` runs one matmul per expert with rows, none for the
    others (a decoded token runs 2 per expert it uses), and backward fills one weight-gradient buffer instead of one
    per expert. The gate multiplies the smaller of the `(rows, I)` activation and the `(rows, H)` output (the same
    value: `down_proj` is linear). `linear_into(block, weight, out)` computes every product, `out = block @ weight.T`
    (default: `torch.mm`; `benchmarks/bench_gemm_library.py` passes oneDNN's to time that library here)."""
    num_experts = module.num_experts
    top_k = top_k_index.shape[-1]
    expert_idx = top_k_index.reshape(-1).clamp(max=num_experts)  # every sentinel becomes `num_experts`
    with torch.no_grad():
        if top_k == 1 and bool((expert_idx[1:] >= expert_idx[:-1]).all()):
            order = None  # rows already grouped by expert
        else:
            order = torch.sort(expert_idx, stable=True).indices
        sorted_experts = expert_idx if order is None else expert_idx[order]
        counts = torch.bincount(sorted_experts, minlength=num_experts + 1)[:num_experts].tolist()
    num_pairs = sum(counts)  # sentinel pairs sort last and are left out
    if num_pairs == 0:
        return torch.zeros_like(hidden_states)
    if order is None:
        pair_rows = None if num_pairs == len(hidden_states) else torch.arange(num_pairs, device=hidden_states.device)
        rows, pair_weights = hidden_states[:num_pairs], top_k_weights.reshape(-1)[:num_pairs]
    else:
        order = order[:num_pairs]
        pair_rows = order // top_k
        rows, pair_weights = hidden_states[pair_rows], top_k_weights.reshape(-1)[order]
    gate, up = _experts_linear(rows, module.gate_up_proj, counts, linear_into).chunk(2, dim=-1)
    activation = module.act_fn(gate) * up
    pair_weights = pair_weights.to(activation.dtype)[:, None]
    if module.down_proj.shape[-1] < module.down_proj.shape[-2]:  # I < H: the gate on the (rows, I) activation
        pair_outputs = _experts_linear(activation * pair_weights, module.down_proj, counts, linear_into)
    else:
        pair_outputs = _experts_linear(activation, module.down_proj, counts, linear_into) * pair_weights
    if order is None and num_pairs == len(hidden_states):  # one row per pair, in order: the pair outputs themselves
        return pair_outputs.to(hidden_states.dtype)
    final_hidden_states = torch.zeros_like(hidden_states)
    return final_hidden_states.index_add_(0, pair_rows, pair_outputs.to(final_hidden_states.dtype))


@use_experts_implementation(experts_interface=REMOE_EXPERTS_FUNCTIONS)
class ReMoEExperts(nn.Module):
    """E SwiGLU experts stored as 3D tensors, with Mixtral's experts contract: `forward(hidden_states (R, H),
    top_k_index (R, K), top_k_weights (R, K)) -> (R, H)`, so every Transformers experts implementation applies.

    ReLU routing gives each token any number of experts: `ReMoESparseMoeBlock` then passes one row per nonzero
    (token, expert) pair with K = 1, which every implementation computes exactly (no padding, no dropped pairs).
    """

    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.num_experts = config.num_routed_experts
        intermediate = config.expert_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, intermediate))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """`eager`: a loop over the experts that received at least one row (`eager_experts_forward`)."""
        return eager_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _decode_runs_the_loop(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """Whether this `grouped_mm` call should run the loop over the experts with rows instead. On CPU, `grouped_mm`
    runs one matmul per expert whether it has rows or not, and multiplies a block of a few rows the slow way round
    (`_FEW_ROWS`). So when decoding (no gradients), the loop runs with fewer rows than experts (some experts then
    necessarily have none) and, for large experts (`_LARGE_MATRIX`), whose faster few-row products pay for the
    loop's per-expert overhead, with fewer than 8 rows per expert on average. Not under `torch.compile`, whose graphs
    keep the pair count symbolic, nor on sharded (DTensor) weights."""
    if (
        torch.compiler.is_compiling()
        or hidden_states.device.type != "cpu"
        or torch.is_grad_enabled()
        or type(experts.down_proj) not in (torch.Tensor, nn.Parameter)  # sharded (DTensor) or another subclass
    ):
        return False
    rows, num_experts = top_k_index.numel(), experts.num_experts
    if experts.down_proj[0].numel() >= _LARGE_MATRIX:
        return rows < _FEW_ROWS.stop * num_experts
    return rows < num_experts


# `torch.nn.functional.grouped_mm` (and `torch._grouped_mm`) need every operand's row stride to be a multiple of 16
# bytes ("strides should be multiple of 16 bytes"): the experts' rows are `hidden_size` and expert-width elements.
_GROUPED_MM_ALIGNMENT_BYTES = 16


def grouped_mm_strides_are_aligned(experts: nn.Module) -> bool:
    """Whether `grouped_mm` can take these experts' operands: `hidden_size` and the expert width (`down_proj` is
    `(E, H, I)`), times the weights' element size, are multiples of 16 bytes (fp32: multiples of 4 elements; bf16 and
    fp16: of 8). Sharded (DTensor) weights, whose local shapes differ, count as aligned (their path is unchanged)."""
    weight = experts.down_proj
    if type(weight) not in (torch.Tensor, nn.Parameter):
        return True
    element_size = weight.element_size()
    return all(dim * element_size % _GROUPED_MM_ALIGNMENT_BYTES == 0 for dim in weight.shape[-2:])


def grouped_mm_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """ReMoE's `grouped_mm`: Transformers' `grouped_mm` experts function, except that it runs the exact loop over the
    experts with rows (`eager_experts_forward`) where `grouped_mm` cannot: operands whose rows are not 16-byte aligned
    (`grouped_mm_strides_are_aligned`, e.g. `intermediate_size=66` or an expert width of 1 or 2 in fp32), and, as a
    shortcut, decoding on CPU with experts without rows (`_decode_runs_the_loop`; the result is the same).
    Registered under Transformers' name in ReMoE's experts interface, so it runs inside the experts' `forward`, where
    Transformers' tensor and expert parallel wrappers enclose it."""
    if not grouped_mm_strides_are_aligned(module) and (
        # Under torch.compile, Transformers calls `grouped_mm` for bf16 weights only (for the others it runs its own
        # fallback, which takes any shape and keeps the graph whole).
        not torch.compiler.is_compiling() or module.down_proj.dtype == torch.bfloat16
    ):
        return eager_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    if _decode_runs_the_loop(module, hidden_states, top_k_index):
        return eager_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](module, hidden_states, top_k_index, top_k_weights)


REMOE_EXPERTS_FUNCTIONS["grouped_mm"] = grouped_mm_experts_forward


# Routers that give every token exactly `routed_top_k` experts (Transformers' fixed-k experts contract applies as is).
FIXED_K_ROUTER_TYPES = ("topk", "sparsemixer", "hash")


class ReMoESparseMoeBlock(nn.Module):
    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.router = ReMoERouter(config)
        self.experts = ReMoEExperts(config)
        self.top_k = config.routed_top_k if config.router_type in FIXED_K_ROUTER_TYPES else None

    def forward(
        self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None, return_router_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`(B, S, H)`, and with `return_router_logits` the router logits `(B*S, E)` too."""
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        logits, gates = self.router(hidden_states) if input_ids is None else self.router(hidden_states, input_ids)
        if self.top_k is not None:
            top_k_weights, top_k_index = torch.topk(gates, self.top_k, dim=-1)
            hidden_states = self.experts(hidden_states, top_k_index, top_k_weights)
        else:
            hidden_states = experts_over_active_pairs(self.experts, hidden_states, gates)
        hidden_states = hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return (hidden_states, logits) if return_router_logits else hidden_states


class ReMoELoryMoeBlock(nn.Module):
    """Lory (Zhong et al. 2024): causal segment routing with soft merging of the experts' parameters.

    Each sequence's real tokens (the 2D attention mask's ones; padding is left out) are cut into segments of
    `router_segment_length` tokens. Segment j > 0 is routed by the mean of the previous segment's hidden states (this
    layer's input): weights `p = softmax(W mean(x_{j-1}))` over all E experts, and its tokens run one SwiGLU FFN whose
    matrices are `sum_e p_e W_e`. The first segment is routed by its own mean with the gradient of its routing weights
    stopped (Lory's rule: its forward sees its own later tokens). No balancing loss. The router is called on one row
    per token (that token's routing representation), so router logits and every routing statistic stay per token.
    Padding positions output zeros.
    """

    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.router = ReMoERouter(config)
        self.experts = ReMoEExperts(config)
        self.segment_length = config.segment_length

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden_states (B, S, H)`; `attention_mask (B, S)`, 1 for real tokens, or None (no padding)."""
        if self.experts.gate_up_proj.shape[0] != self.router.weight.shape[0]:
            raise ValueError(
                "router_type='lory' merges the parameters of every expert: expert parallelism, which keeps a share of "
                "the experts on each rank, does not apply to it"
            )
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        length = self.segment_length
        num_segments = -(-sequence_length // length)
        num_slots = num_segments * length
        if attention_mask is None or attention_mask.dim() != 2:
            real = torch.ones(batch_size, sequence_length, dtype=torch.bool, device=hidden_states.device)
        else:
            real = attention_mask.to(hidden_states.device).bool()
        positions = real.long().cumsum(dim=-1) - 1  # index among the row's real tokens
        slots = torch.where(real, positions, num_slots)  # padding goes to one extra slot, dropped below
        token_segments = torch.where(real, positions // length, num_segments)

        expanded = slots[..., None].expand(-1, -1, hidden_dim)
        slotted = hidden_states.new_zeros(batch_size, num_slots + 1, hidden_dim).scatter(1, expanded, hidden_states)
        segments = slotted[:, :num_slots].view(batch_size, num_segments, length, hidden_dim)
        sizes = real.new_zeros(batch_size, num_segments + 1, dtype=hidden_states.dtype)
        sizes = sizes.scatter_add(1, token_segments, real.to(hidden_states.dtype))[:, :num_segments]
        segment_means = segments.sum(dim=2) / sizes.clamp(min=1)[..., None]  # (B, J, H), real tokens only
        routing_inputs = torch.cat([segment_means[:, :1], segment_means[:, :-1]], dim=1)  # segment j <- j - 1

        token_inputs = routing_inputs.gather(
            1, token_segments.clamp(max=num_segments - 1)[..., None].expand_as(expanded)
        )
        _, token_weights = self.router(token_inputs.reshape(-1, hidden_dim))
        token_weights = token_weights.view(batch_size, sequence_length, -1)
        # Every token of a segment carries the same weights: their mean is the segment's (and splits its gradient).
        weights = token_weights.new_zeros(batch_size, num_segments + 1, token_weights.shape[-1]).scatter_reduce(
            1, token_segments[..., None].expand_as(token_weights), token_weights, reduce="mean", include_self=False
        )[:, :num_segments]
        weights = torch.cat([weights[:, :1].detach(), weights[:, 1:]], dim=1)  # the first segment: stop-gradient
        weights = weights.to(self.experts.gate_up_proj.dtype)
        gate_up_proj = torch.einsum("bje,eoh->bjoh", weights, self.experts.gate_up_proj)
        down_proj = torch.einsum("bje,ehi->bjhi", weights, self.experts.down_proj)
        gate, up = torch.matmul(segments.to(gate_up_proj.dtype), gate_up_proj.transpose(-1, -2)).chunk(2, dim=-1)
        output = torch.matmul(self.experts.act_fn(gate) * up, down_proj.transpose(-1, -2))
        output = F.pad(output.reshape(batch_size, num_slots, hidden_dim), (0, 0, 0, 1))  # the padding slot: zeros
        return output.gather(1, expanded).to(hidden_states.dtype)


def experts_over_active_pairs(experts: nn.Module, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """`sum_e gates[:, e] * expert_e(hidden_states)` for gates (T, E) with any number of nonzeros per token: the
    experts get one row per nonzero (token, expert) pair (K = 1), and the outputs are summed back per token."""
    expert_idx, token_idx = (gates.detach() != 0).t().nonzero(as_tuple=True)  # pairs grouped by expert
    pair_outputs = experts(hidden_states[token_idx], expert_idx[:, None], gates[token_idx, expert_idx, None])
    return torch.zeros_like(hidden_states).index_add_(0, token_idx, pair_outputs.to(hidden_states.dtype))


class ReMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: ReMoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = ReMoEAttention(config, layer_idx)
        self.routes_by_token_id = config.is_moe_layer(layer_idx) and config.router_type == "hash"
        if config.is_moe_layer(layer_idx) and config.router_type == "lory":
            self.mlp = ReMoELoryMoeBlock(config)
        elif config.is_moe_layer(layer_idx):
            self.mlp = ReMoESparseMoeBlock(config)
        else:
            self.mlp = ReMoEMLP(config, config.intermediate_size * config.num_experts_per_tok)
        self.input_layernorm = ReMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ReMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.router_loss_type = router_loss_type(config) if isinstance(self.mlp, ReMoESparseMoeBlock) else None
        self.l1_top_k, self.load_balance = config.routed_top_k, config.load_balance

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        routing_input_ids: torch.LongTensor | None = None,
        routing_attention_mask: torch.Tensor | None = None,
        router_loss: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`routing_input_ids`: the token ids, for the hash router; `routing_attention_mask`: the 2D padding mask, for
        Lory's segments and the router loss (other layers ignore them).

        With `router_loss` (training), an MoE layer whose router has a loss (`router_loss_type`) returns
        `(hidden_states, its term)`: the term leaves the layer as one of its outputs, so it keeps its gradient under
        every activation checkpointing, reentrant included (which recomputes the layer in backward, outside the
        graph of anything captured from inside it)."""
        # The cache arrives under the installed Transformers' name (`CACHE_NAME`), which is the name
        # `GradientCheckpointingLayer` looks for when it drops the cache under gradient checkpointing.
        cache = cache if cache is not None else past_key_values
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if router_loss and self.router_loss_type is not None:
            hidden_states, router_logits = self.mlp(hidden_states, return_router_logits=True)
            logits = _valid_token_rows((router_logits,), routing_attention_mask)[0]
            if self.router_loss_type == "l1":
                term = l1_layer_loss(logits, self.l1_top_k, self.load_balance)
            else:
                term = switch_layer_loss(logits, self.mlp.top_k)
            return residual + hidden_states, term
        if self.routes_by_token_id:
            hidden_states = self.mlp(hidden_states, routing_input_ids)
        elif isinstance(self.mlp, ReMoELoryMoeBlock):
            hidden_states = self.mlp(hidden_states, routing_attention_mask)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class ReMoEL1Controller(nn.Module):
    """The adaptive L1 coefficient lambda (fp32 model state) and the routing statistics of the current step.

    Once per optimizer step, `update()` turns the statistics into the step sparsity `S` and sets
    `lambda <- lambda * alpha` if `S < target`, else `lambda <- lambda / alpha` (as the official implementation).
    The accumulators are plain tensors, not buffers, so DDP never overwrites them with rank 0's values.
    """

    def __init__(self, config: ReMoEConfig):
        super().__init__()
        self.target_sparsity = config.target_sparsity
        self.multiplier = config.l1_coef_multiplier
        self.num_experts = config.num_routed_experts
        self.num_moe_layers = config.num_moe_layers
        self.register_buffer("l1_coef", torch.tensor(config.l1_coef_init, dtype=torch.float32))
        self.reset_statistics()

    def _apply(self, fn, recurse: bool = True):
        # lambda stays fp32 whatever dtype the model is cast to (`model.to(torch.bfloat16)`); only its device follows.
        l1_coef = self.l1_coef
        super()._apply(fn, recurse)
        if self.l1_coef.dtype != torch.float32:
            moved = torch.empty_like(self.l1_coef, dtype=torch.float32)
            self.l1_coef = moved if l1_coef.is_meta else moved.copy_(l1_coef)
        return self

    def reset_statistics(self) -> None:
        self.tokens_per_expert: torch.Tensor | None = None  # (L, E) tokens routed to each expert
        self.num_tokens: torch.Tensor | None = None  # () tokens seen by each layer
        self.loss_sums: torch.Tensor | None = None  # (3,): sum of L_lm, sum of coef * L_aux, micro-batches with both

    @torch.no_grad()
    def record(
        self,
        tokens_per_expert: torch.Tensor,
        num_tokens: int,
        loss_lm: torch.Tensor | None = None,
        loss_reg: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one micro-batch: `tokens_per_expert (L, E)` counts over `num_tokens` tokens and, when the batch
        has labels, its LM loss and its weighted regulariser (`lambda * L_reg`, or the TopK balancing term)."""
        counts = tokens_per_expert.to(torch.float64)
        tokens = torch.tensor(float(num_tokens), dtype=torch.float64, device=counts.device)
        losses = torch.zeros(3, dtype=torch.float64, device=counts.device)
        if loss_lm is not None:
            loss_reg = loss_lm.new_zeros(()) if loss_reg is None else loss_reg  # routers without a regulariser
            losses = torch.stack([loss_lm.detach().double(), loss_reg.detach().double().to(loss_lm.device)])
            losses = torch.cat([losses.to(counts.device), losses.new_ones(1).to(counts.device)])
        if self.tokens_per_expert is None:
            self.tokens_per_expert, self.num_tokens, self.loss_sums = counts, tokens, losses
        else:
            self.tokens_per_expert = self.tokens_per_expert + counts
            self.num_tokens = self.num_tokens + tokens
            self.loss_sums = self.loss_sums + losses

    @torch.no_grad()
    def update(self, process_group=None, update_l1_coef: bool = True) -> dict[str, float]:
        """Reduce the step's statistics over the data-parallel group, update lambda once, and return the metrics."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.tokens_per_expert is None:
            if not distributed:
                return {}
            # Nothing routed on this rank this step: still join the reduction the other ranks are in.
            self.record(torch.zeros(self.num_moe_layers, self.num_experts, device=self.l1_coef.device), 0)
        totals = torch.cat([self.tokens_per_expert.flatten(), self.num_tokens.view(1), self.loss_sums])
        if distributed:
            torch.distributed.all_reduce(totals, group=process_group)
        tokens_per_expert = totals[:-4].view_as(self.tokens_per_expert)
        num_tokens, (loss_lm_sum, loss_reg_sum, loss_count) = totals[-4], totals[-3:].tolist()
        self.reset_statistics()
        if num_tokens.item() == 0:
            return {}

        sparsity_per_layer = layer_sparsity(tokens_per_expert, num_tokens)
        sparsity = sparsity_per_layer.mean().item()
        if update_l1_coef:
            factor = self.multiplier if sparsity < self.target_sparsity else 1.0 / self.multiplier
            self.l1_coef.mul_(torch.tensor(factor, dtype=torch.float32, device=self.l1_coef.device))
        load = tokens_per_expert / tokens_per_expert.mean(dim=1, keepdim=True).clamp_min(1e-12)
        metrics = {"remoe/sparsity": sparsity, "remoe/l1_coef": self.l1_coef.item()}
        metrics["remoe/experts_per_token"] = (1.0 - sparsity) * self.num_experts
        if loss_count:
            metrics["remoe/loss_lm"] = loss_lm_sum / loss_count
            metrics["remoe/loss_reg"] = loss_reg_sum / loss_count
        for layer, (layer_value, layer_load) in enumerate(zip(sparsity_per_layer.tolist(), load.tolist(), strict=True)):
            metrics[f"remoe/sparsity/layer_{layer}"] = layer_value
            metrics[f"remoe/max_load/layer_{layer}"] = max(layer_load)
        return metrics


def active_experts(
    router_logits: torch.Tensor, config: ReMoEConfig, top_k: int | None = None, in_training: bool = False
) -> torch.Tensor:
    """Which experts each token uses, `(T, E)` booleans: the positive ReLU gates; with Expert Choice in training
    (`in_training`), the experts' top-C choices over the T rows; else the top-k router logits (`top_k` defaults to the
    config's `k * G`), which for Hash are its table's experts and for Lory the largest weight of the segment's merge
    (Lory uses every expert; this is its dominant one). SparseMixer-v2 and sampled TopK draw their experts in
    training, so their training statistics count the top-k instead of the draws.

    The one definition of routing behind every statistic: the controller's sparsity, evaluation, `remoe analyze`,
    BTX's domain shares and `remoe generate --show_routing`."""
    if config.router_type == "relu":
        return router_logits > 0
    if config.router_type == "expert_choice" and in_training:
        return expert_choice_mask(router_logits, top_k or config.routed_top_k, config.router_capacity_factor)
    top_indices = torch.topk(router_logits, top_k or config.routed_top_k, dim=-1).indices
    return torch.zeros_like(router_logits, dtype=torch.bool).scatter_(-1, top_indices, True)


def expert_token_counts(
    router_logits: tuple[torch.Tensor, ...], config: ReMoEConfig, top_k: int | None = None, in_training: bool = False
) -> torch.Tensor:
    """Tokens routed to each expert, per MoE layer: `(L, E)` float32, no gradient."""
    counts = [active_experts(logits.detach(), config, top_k, in_training).sum(dim=0) for logits in router_logits]
    return torch.stack(counts).float()


def layer_sparsity(tokens_per_expert: torch.Tensor, num_tokens: float | torch.Tensor) -> torch.Tensor:
    """Per-layer sparsity `1 - nnz / (T * E)` from `(L, E)` counts over `num_tokens` tokens: `(L,)`."""
    return 1.0 - tokens_per_expert.sum(dim=-1) / (num_tokens * tokens_per_expert.shape[-1])


def router_loss_type(config: ReMoEConfig) -> str | None:
    """The router loss training adds: `"l1"` (ReMoE's regulariser), `"switch"` (the balancing loss) or None."""
    if config.uses_l1_controller:
        return "l1"
    return "switch" if config.uses_balancing_loss else None


def l1_layer_loss(logits: torch.Tensor, num_experts_per_tok: int, load_balance: str) -> torch.Tensor:
    """One layer's L_reg: `(1/T) sum_t sum_e f_e ReLU(logits)_te`, with `f_e = E/(kT) * #{t: active}` detached
    (`refined_l1`) or `f_e = 1` (`l1`). `num_experts_per_tok` is the routed k (`k * G`)."""
    gates = F.relu(logits.float())
    num_tokens, num_experts = gates.shape
    gate_sums = gates.sum(dim=0)
    num_tokens = max(num_tokens, 1)  # a micro-batch of padding only contributes 0, not NaN
    if load_balance == "refined_l1":
        frequency = (gates > 0).sum(dim=0).detach() * (num_experts / (num_experts_per_tok * num_tokens))
        gate_sums = gate_sums * frequency
    return gate_sums.sum() / num_tokens


def l1_regularization_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts_per_tok: int, load_balance: str
) -> torch.Tensor:
    """ReMoE's L_reg: the mean over layers of `l1_layer_loss`."""
    return reduce_layer_losses([l1_layer_loss(logits, num_experts_per_tok, load_balance) for logits in router_logits])


def switch_layer_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """One layer's Switch Transformer balancing loss `E * sum_e f_e P_e` (f normalised by k)."""
    probs = F.softmax(logits.float(), dim=-1)
    num_tokens, num_experts = probs.shape
    num_tokens = max(num_tokens, 1)  # a micro-batch of padding only contributes 0, not NaN
    top_indices = torch.topk(logits.detach(), top_k, dim=-1).indices
    # histc, not bincount: no host sync on CUDA.
    counts = torch.histc(top_indices.float(), bins=num_experts, min=0, max=num_experts)
    fraction = counts / (num_tokens * top_k)
    return num_experts * (fraction * probs.sum(dim=0) / num_tokens).sum()


def switch_load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, reduction: str = "mean"
) -> torch.Tensor:
    """`switch_layer_loss` of each layer, summed over the layers (`reduction="sum"`, Megatron's convention) or
    averaged."""
    return reduce_layer_losses([switch_layer_loss(logits, top_k) for logits in router_logits], reduction)


def reduce_layer_losses(losses: list[torch.Tensor] | tuple[torch.Tensor, ...], reduction: str = "mean") -> torch.Tensor:
    """The layers' router loss terms summed (`reduction="sum"`) or averaged, on the first term's device."""
    stacked = torch.stack([loss.to(losses[0].device) for loss in losses])
    return stacked.sum() if reduction == "sum" else stacked.mean()


class ReMoEPreTrainedModel(PreTrainedModel):
    config: ReMoEConfig
    config_class = ReMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ReMoEDecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(ReMoERouter, index=0),
        "hidden_states": ReMoEDecoderLayer,
        "attentions": ReMoEAttention,
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Transformers' `from_pretrained`, reading safetensors weights only unless `use_safetensors=False` is passed:
        a folder or repository with only pickle weights (`pytorch_model.bin`) is an error, not unpickled."""
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        # Megatron's scaled init of the projections that write into the residual stream (`o_proj`, `down_proj`).
        output_std = std / math.sqrt(2 * self.config.num_hidden_layers) if self.config.scaled_output_init else std
        if isinstance(module, ReMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=output_std)
        elif isinstance(module, nn.Linear) and getattr(module, "writes_residual", False):
            init.normal_(module.weight, mean=0.0, std=output_std)
        elif isinstance(module, ReMoERouter) and module.router_type == "hash":
            table = random_hash_table(module.hash_table.shape[0], module.num_experts, module.top_k, module.hash_seed)
            init.copy_(module.hash_table, table.to(module.hash_table.device))
        elif isinstance(module, ReMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ReMoEL1Controller):
            init.constant_(module.l1_coef, self.config.l1_coef_init)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Transformers' names (`eager`, `batched_mm`, `grouped_mm`, ...) and, with `remoe` installed, `triton`.

        Default: `grouped_mm` (Transformers' function: `torch.nn.functional.grouped_mm` where torch has it on the
        device, else Transformers' loop over the experts with rows), with or without `remoe` installed; where
        Transformers cannot read this module's source it falls back to `eager`, which also runs without per-expert
        weight-gradient buffers."""
        if requested_experts not in (None, *experts_implementations()):
            raise ValueError(
                f"`experts_implementation` must be one of {experts_implementations()} for ReMoE, "
                f"got {requested_experts!r}"
            )
        if (
            requested_experts is not None
            and requested_experts != "eager"
            and requested_experts not in REMOE_EXPERTS_FUNCTIONS
        ):
            raise ValueError(
                f"`experts_implementation={requested_experts!r}` is not available here (it needs the `remoe` package "
                f"and triton); available: {['eager', *REMOE_EXPERTS_FUNCTIONS]}"
            )
        if requested_experts == "triton":
            return requested_experts
        return super().get_correct_experts_implementation(requested_experts)


@dataclasses.dataclass
class ReMoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    router_losses (`tuple[torch.Tensor]`, *optional*):
        Each MoE layer's router loss term (ReMoE's L1 regulariser or the balancing loss), in layer order, when the
        model is called with `router_loss=True` (training).
    """

    router_losses: tuple[torch.Tensor, ...] | None = None


class ReMoEModel(ReMoEPreTrainedModel):
    def __init__(self, config: ReMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        # No `padding_idx`: with pad = eos (GPT-2 style tokenizers) it would keep the end-of-text embedding at zero.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [ReMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = ReMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ReMoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        router_loss: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ReMoEModelOutputWithPast:
        """`router_loss`: every MoE layer with a router loss also returns its term (`router_losses`)."""
        cache = _cache_argument(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if self.config.router_type == "hash" and input_ids is None:
            raise ValueError(
                "router_type='hash' routes each token by its id: pass input_ids (inputs_embeds alone cannot be hashed)"
            )
        if self.config.router_type == "lory" and (use_cache or cache is not None):
            raise ValueError(
                "router_type='lory' cannot run with a KV cache: each segment's experts are merged from the previous "
                "segment's hidden states at every MoE layer, which the cache does not keep. Generate with "
                "use_cache=False (the default of lory configs): every step recomputes the sequence, exactly"
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        router_losses = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            layer_output = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                routing_input_ids=input_ids if self.config.router_type == "hash" else None,
                routing_attention_mask=attention_mask if router_loss or self.config.router_type == "lory" else None,
                router_loss=router_loss,
                **{CACHE_NAME: cache},
                **kwargs,
            )
            if isinstance(layer_output, tuple):
                hidden_states, term = layer_output
                router_losses.append(term)
            else:
                hidden_states = layer_output
        hidden_states = self.norm(hidden_states)
        return ReMoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            router_losses=tuple(router_losses) if router_loss else None,
            **{CACHE_NAME: cache},
        )


class ReMoEForCausalLM(ReMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    # The regulariser is a per-micro-batch mean like the LM loss, so the Trainer averages both over accumulation.
    accepts_loss_kwargs = False

    def __init__(self, config: ReMoEConfig):
        super().__init__(config)
        self.model = ReMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.controller = ReMoEL1Controller(config) if config.has_experts else None
        # lambda is fp32 model state, also when the model is loaded in bf16 or fp16 (dense models have none).
        self._keep_in_fp32_modules_strict = ["controller"] if self.controller is not None else []
        self.routed_top_k = config.routed_top_k
        self.post_init()

    def set_routed_top_k(self, top_k: int | None = None) -> None:
        """TopK routing: route every token to `top_k` experts from now on (None: back to the config's `k * G`), e.g.
        the near-dense warmup the ReMoE paper compares with; the config and the saved model keep their k."""
        if self.config.router_type != "topk":
            raise ValueError(f"set_routed_top_k applies to router_type='topk' only, got {self.config.router_type!r}")
        top_k = self.config.routed_top_k if top_k is None else top_k
        if not 1 <= top_k <= self.config.num_routed_experts:
            raise ValueError(f"top_k must be between 1 and {self.config.num_routed_experts}, got {top_k}")
        self.routed_top_k = top_k
        for module in self.modules():
            if isinstance(module, (ReMoESparseMoeBlock, ReMoERouter)):
                module.top_k = top_k

    def update_l1_coef(self, process_group=None) -> dict[str, float]:
        """Close the optimizer step: reduce the routing statistics, update lambda (ReLU routing), return metrics."""
        if self.controller is None:
            return {}
        return self.controller.update(process_group, update_l1_coef=self.config.uses_l1_controller)

    @property
    def l1_coef(self) -> float | None:
        """Current lambda of the adaptive L1 controller."""
        return None if self.controller is None else self.controller.l1_coef.item()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        cache = _cache_argument(cache, past_key_values)
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        has_router = self.controller is not None
        regularize = has_router and self.training and torch.is_grad_enabled()
        loss_type = router_loss_type(self.config) if has_router else None
        outputs: ReMoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=has_router and (output_router_logits or regularize),
            router_loss=regularize and loss_type is not None,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        aux_loss = None
        if has_router and (output_router_logits or regularize):
            router_logits = _valid_token_rows(outputs.router_logits, attention_mask)
            coef, reduction = None, "mean"
            if loss_type == "l1":
                coef = self.controller.l1_coef
            elif loss_type == "switch":
                coef, reduction = self.config.router_aux_loss_coef, self.config.router_aux_loss_reduction
            if outputs.router_losses:  # training: the layers' own terms, which carry their gradients
                aux_loss = reduce_layer_losses(outputs.router_losses, reduction)
            elif loss_type == "l1":
                aux_loss = l1_regularization_loss(router_logits, self.config.routed_top_k, self.config.load_balance)
            elif loss_type == "switch":
                aux_loss = switch_load_balancing_loss(router_logits, self.routed_top_k, reduction)
            if regularize:
                weighted = None if loss is None or coef is None else coef * aux_loss
                if self.config.router_type == "expert_choice":  # the experts chose among every row, padding included
                    router_logits = outputs.router_logits
                counts = expert_token_counts(router_logits, self.config, self.routed_top_k, in_training=True)
                self.controller.record(counts, router_logits[0].shape[0], loss, weighted)
            if loss is not None and coef is not None:
                loss = loss + coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


def _cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache from `cache` or its pre-5.24 name `past_key_values` (deprecated where `cache` exists)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values` (its older name), not both")
    if CACHE_NAME == "cache":
        warnings.warn(
            "`past_key_values` is deprecated since Transformers 5.24; pass the KV cache as `cache`",
            FutureWarning,
            stacklevel=3,
        )
    return past_key_values


def _valid_token_rows(
    router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Drop padded positions (2D attention mask) from each layer's (T, E) router logits."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != router_logits[0].shape[0]:
        return router_logits
    valid = attention_mask.reshape(-1).to(router_logits[0].device).bool()
    return tuple(logits[valid] for logits in router_logits)


__all__ = ["ReMoEForCausalLM", "ReMoEModel", "ReMoEPreTrainedModel"]

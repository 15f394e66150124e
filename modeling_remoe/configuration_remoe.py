# Copyright 2026 The remoe authors. Licensed under the Apache License, Version 2.0.
"""ReMoE model configuration."""

import math
import types
import typing
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import MixtralConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

try:  # huggingface_hub's strict-dataclass validation errors: a field's type, a class validator (`validate_*`)
    from huggingface_hub.dataclasses import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

    STRICT_VALIDATION_ERRORS: tuple[type[Exception], ...] = (
        StrictDataclassFieldValidationError,
        StrictDataclassClassValidationError,
    )
except ImportError:  # a release that does not export them there: they propagate as they are
    STRICT_VALIDATION_ERRORS = ()

ROUTER_TYPES = ("relu", "topk", "dense", "hash", "expert_choice", "sparsemixer", "lory")
# Routers whose training adds the Switch balancing loss (`router_aux_loss_coef`); ReLU routing adds the L1 term instead,
# and Hash, Expert Choice and Lory add nothing (fixed, capacity-balanced and soft routing).
BALANCING_LOSS_ROUTER_TYPES = ("topk", "sparsemixer")
LOAD_BALANCE_TYPES = ("refined_l1", "l1")
AUX_LOSS_REDUCTIONS = ("sum", "mean")
# Fields annotated `float | int`: an int is accepted (JSON and YAML write `0` for 0.0) and stored as a float.
FLOAT_FIELDS = (
    "initializer_range",
    "rms_norm_eps",
    "attention_dropout",
    "l1_coef_init",
    "l1_coef_multiplier",
    "router_aux_loss_coef",
    "router_capacity_factor",
    "router_jitter_eps",
)
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


# Transformers' parallel plans, by module kind. The experts follow Mixtral's layout and contract, so they are sharded as
# the installed release shards Mixtral's: expert parallel over the experts (Transformers >= 5.19) and, up to 5.24, also
# tensor parallel over the expert FFN width (5.25 deprecated `moe_tp_experts`: under tensor parallelism the experts
# stay whole, and expert parallelism shards them). Both are exact for ReLU routes too, which reach the experts as one
# row per (token, expert) pair.
_ATTENTION_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}
_DENSE_FFN_TP_PLAN = {
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
_EXPERTS_TP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}
_EXPERTS_EP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
    "layers.*.mlp.experts.down_proj": "grouped_gemm",
    "layers.*.mlp.experts": "ep_dispatch_experts",
}


def experts_are_tensor_parallel() -> bool:
    """Whether the installed Transformers shards MoE experts under tensor parallelism (its Mixtral plan does so up to
    5.24)."""
    return any(name.startswith("layers.*.mlp.experts") for name in MixtralConfig.base_model_tp_plan)


def rope_types() -> tuple[str, ...]:
    """The RoPE types the model computes: `"default"` and Transformers' `ROPE_INIT_FUNCTIONS`."""
    return ("default", *ROPE_INIT_FUNCTIONS)


def _describe_type(hint: Any) -> str:
    """A field annotation in words, for error messages: `int` -> "an int", `int | None` -> "an int or None"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if set(typing.get_args(hint)) == {float, int}:
            return "a number"
        return " or ".join(dict.fromkeys(_describe_type(arg) for arg in typing.get_args(hint)))
    if hint is type(None):
        return "None"
    if hint is RopeParameters or typing.get_origin(hint) is dict:
        return "a dict"
    names = {int: "an int", float: "a number", str: "a string", bool: "a bool (true or false)", dict: "a dict"}
    if hint in names:
        return names[hint]
    return getattr(hint, "__name__", str(hint))


def _validation_message(config_class: type, error: Exception, values: dict[str, Any]) -> str:
    """One line naming the field for a strict-dataclass validation error (`values`: what the config was given)."""
    # huggingface_hub's message starts "Validation error for field 'NAME':" for a field's type
    name = str(error).partition("Validation error for field '")[2].partition("'")[0]
    fields = getattr(config_class, "__dataclass_fields__", {})
    if name in fields and name in values:
        value = values[name]
        got = "None" if value is None else f"{type(value).__name__} {value!r}"
        return f"`{name}` must be {_describe_type(fields[name].type)}, got {got}"
    cause = error.__cause__ if error.__cause__ is not None else error  # a class validator's own message
    return " ".join(str(cause).split())


def experts_implementations() -> tuple[str, ...]:
    """The experts implementations ReMoE accepts: Transformers' (`eager`, `batched_mm`, `grouped_mm`, ...) and the
    project's `triton` kernels (which need the `remoe` package)."""
    return ("eager", *ALL_EXPERTS_FUNCTIONS, "triton")


@strict
class ReMoEConfig(PreTrainedConfig):
    r"""Configuration of a LLaMA-style decoder whose FFNs are ReLU-routed (ReMoE), TopK-routed or dense.

    Args:
        num_experts (`int`, defaults to 8): experts per MoE layer before the granularity split (E).
        num_experts_per_tok (`int`, defaults to 1): TopK's k; ReMoE's target sparsity is `1 - k / E`.
        granularity (`int`, defaults to 1): fine-grained experts G: `E * G` experts of size `intermediate_size / G`.
        router_type (`str`, defaults to `"relu"`): `"relu"` (ReMoE), `"topk"` (softmax, top-k, Switch balancing loss),
            `"dense"` (a SwiGLU FFN of the same active size, `k * intermediate_size`), or one of the ReMoE paper's
            other baselines: `"hash"` (Hash Layers: each token id goes to k fixed random experts), `"expert_choice"`
            (each expert takes its top-C tokens of the batch in training), `"sparsemixer"` (GRIN's SparseMixer-v2
            top-k with its gradient estimator), `"lory"` (segment-level soft merging of the experts' parameters).
        moe_layer_freq (`int`, defaults to 1): every `moe_layer_freq`-th layer is MoE, the others dense.
        l1_coef_init (`float`, defaults to 1e-8): lambda_0 of the adaptive L1 controller.
        l1_coef_multiplier (`float`, defaults to 1.2): alpha of the controller, > 1.
        load_balance (`str`, defaults to `"refined_l1"`): `"refined_l1"` (load-balanced L1) or `"l1"` (plain L1).
        router_aux_loss_coef (`float`, defaults to 0.01): weight of the Switch load-balancing loss (TopK only).
        router_renormalize (`bool`, defaults to `False`): TopK only: divide the k kept softmax probabilities by their
            sum (BTX's router `SoftMax(TopK(Wx))`, Mixtral, Qwen3-MoE `norm_topk_prob`); ReMoE's TopK baseline keeps
            them as they are (Megatron).
        router_aux_loss_reduction (`str`, defaults to `"sum"`): how the Switch balancing loss combines the MoE layers:
            `"sum"` (Megatron and the ReMoE paper: `coef * aux_l` added for every layer) or `"mean"`.
        router_sampling (`bool`, defaults to `False`): TopK only: in training, sample the k experts from the router's
            softmax (Gumbel-max, straight-through gates; BTX's "sample top-1"); inference keeps the top-k.
        router_hash_seed (`int`, defaults to 0): `"hash"` only: seed of the random token-id -> experts table drawn
            at initialisation (the table itself is saved with the model, as the buffer `mlp.router.hash_table`).
        router_capacity_factor (`float`, defaults to 1.0): `"expert_choice"` only: each expert takes
            `C = ceil(router_capacity_factor * k * G * T / (E * G))` of the T tokens of a training batch, so tokens use
            `k * G` experts on average.
        router_jitter_eps (`float`, defaults to 0.01): `"sparsemixer"` only: experts whose score is more than
            `2 * eps` (relative) below the best remaining one are masked out before sampling (GRIN's default 0.01).
        router_segment_length (`int`, *optional*): `"lory"` only: tokens per segment; segment j uses the experts
            merged with the weights routed from segment j - 1. Default: Lory's 256, at most a quarter of
            `max_position_embeddings` (so that a full sequence has at least 4 segments).
        scaled_output_init (`bool`, defaults to `False`): initialise the output projections (attention `o_proj`,
            dense and expert `down_proj`) at `initializer_range / sqrt(2 * num_hidden_layers)` (Megatron's scaled
            init, the ReMoE paper's recipe) instead of `initializer_range`.
        experts_implementation (`str`, *optional*): one of Transformers' experts implementations (`"eager"`,
            `"batched_mm"`, `"grouped_mm"`, ...) or `"triton"` (the project's kernels); default: `"grouped_mm"` where
            it runs, else `"eager"`. Transformers keeps it in `config._experts_implementation`.

    Example:

    ```python
    >>> import remoe
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_config(remoe.ReMoEConfig(num_hidden_layers=2, hidden_size=64))
    ```"""

    model_type = "remoe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache's name since / before Transformers 5.24
    default_theta = 1000000.0
    base_model_ep_plan = _EXPERTS_EP_PLAN  # matches nothing in a dense model, which has no experts to shard
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float | int = 0.01
    rms_norm_eps: float | int = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    num_experts: int = 8
    num_experts_per_tok: int = 1
    granularity: int = 1
    router_type: str = "relu"
    moe_layer_freq: int = 1
    l1_coef_init: float | int = 1e-8
    l1_coef_multiplier: float | int = 1.2
    load_balance: str = "refined_l1"
    router_aux_loss_coef: float | int = 0.01
    router_renormalize: bool = False
    router_aux_loss_reduction: str = "sum"
    router_sampling: bool = False
    router_hash_seed: int = 0
    router_capacity_factor: float | int = 1.0
    router_jitter_eps: float | int = 0.01
    router_segment_length: int | None = None
    scaled_output_init: bool = False
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size >= 1 and self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                    f"({self.num_attention_heads}), or set `head_dim`"
                )
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        for name, value in (("dtype", self.dtype), ("torch_dtype", kwargs.get("torch_dtype"))):
            if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
                raise ValueError(
                    f"`{name}` must be a torch dtype name such as 'float32', 'bfloat16' or 'float16', got {value!r}"
                )
        if self.router_type == "lory":
            self.use_cache = False  # segment routing needs state a KV cache does not keep (see ReMoELoryMoeBlock)
        self.base_model_tp_plan = self._tensor_parallel_plan()  # not saved: Transformers drops it from config.json
        super().__post_init__(**kwargs)
        self._check_values()

    def _tensor_parallel_plan(self) -> dict[str, str]:
        """Transformers' tensor-parallel plan for the kinds of layer this config builds (dense FFNs, experts)."""
        plan = dict(_ATTENTION_TP_PLAN)
        if not isinstance(self.moe_layer_freq, int) or self.moe_layer_freq < 1:
            return plan  # `_check_values` reports it
        moe_layers = [self.is_moe_layer(layer) for layer in range(self.num_hidden_layers)]
        if not all(moe_layers):
            plan.update(_DENSE_FFN_TP_PLAN)
        if any(moe_layers) and self.router_type != "lory" and experts_are_tensor_parallel():
            plan.update(_EXPERTS_TP_PLAN)  # Lory merges whole experts: they stay replicated
        return plan

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Transformers' `from_dict` (`from_pretrained` reads config.json through it), with every invalid value a
        `ValueError` naming the field: huggingface_hub's strict-dataclass errors (a wrong type, a class validator)
        are turned into one."""
        try:
            result = super().from_dict(config_dict, **kwargs)
        except STRICT_VALIDATION_ERRORS as error:
            raise ValueError(_validation_message(cls, error, {**config_dict, **kwargs})) from error
        # from_pretrained sets keyword overrides after construction: check them too.
        (result[0] if isinstance(result, tuple) else result)._check_values()
        return result

    def _check_values(self) -> None:
        """Raise `ValueError` naming the field for every invalid value (run at construction). An int given for a
        float field (`FLOAT_FIELDS`) is stored as a float."""
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.head_dim < 1:
            raise ValueError(f"`head_dim` must be >= 1, got {self.head_dim}")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads})"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                "`hidden_act` must be one of Transformers' activations (transformers.activations.ACT2FN), e.g. "
                f"'silu', 'gelu', 'gelu_new', 'relu', 'tanh'; got {self.hidden_act!r}"
            )
        self._check_rope_parameters()
        self._check_token_ids()
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"`router_type` must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.load_balance not in LOAD_BALANCE_TYPES:
            raise ValueError(f"`load_balance` must be one of {LOAD_BALANCE_TYPES}, got {self.load_balance!r}")
        if self._experts_implementation not in (None, *experts_implementations()):
            raise ValueError(
                f"`experts_implementation` must be one of {experts_implementations()}, "
                f"got {self._experts_implementation!r}"
            )
        if self.num_experts < 1:
            raise ValueError(f"`num_experts` must be >= 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` must be between 1 and num_experts={self.num_experts}, "
                f"got {self.num_experts_per_tok}"
            )
        if self.granularity < 1 or self.intermediate_size % self.granularity:
            raise ValueError(
                f"`granularity` must be >= 1 and divide intermediate_size={self.intermediate_size}, "
                f"got {self.granularity}"
            )
        for name in ("router_renormalize", "router_sampling"):
            if getattr(self, name) and self.router_type != "topk":
                raise ValueError(f"`{name}` applies to router_type='topk' only, got {self.router_type!r}")
        if self.router_type == "lory" and (self.num_experts_per_tok != 1 or self.granularity != 1):
            raise ValueError(
                "router_type='lory' merges all experts into one FFN per segment, so it needs num_experts_per_tok=1 and "
                f"granularity=1, got num_experts_per_tok={self.num_experts_per_tok}, granularity={self.granularity}"
            )
        if self.router_type == "lory" and self.use_cache:
            raise ValueError("router_type='lory' cannot use a KV cache (segment routing needs state it does not keep)")
        if self.router_segment_length is not None and self.router_segment_length < 1:
            raise ValueError(f"`router_segment_length` must be >= 1, got {self.router_segment_length}")
        if not 0 <= self.router_hash_seed < 2**63:
            raise ValueError(f"`router_hash_seed` must be in [0, 2**63), got {self.router_hash_seed}")
        for name in ("router_capacity_factor", "router_jitter_eps", "rms_norm_eps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a finite number > 0, got {value}")
        if self.router_aux_loss_reduction not in AUX_LOSS_REDUCTIONS:
            raise ValueError(
                f"`router_aux_loss_reduction` must be one of {AUX_LOSS_REDUCTIONS}, got {self.router_aux_loss_reduction!r}"
            )
        if self.moe_layer_freq < 1:
            raise ValueError(f"`moe_layer_freq` must be >= 1, got {self.moe_layer_freq}")
        if self.has_experts and self.moe_layer_freq > self.num_hidden_layers:
            raise ValueError(
                f"`moe_layer_freq` ({self.moe_layer_freq}) must be <= num_hidden_layers ({self.num_hidden_layers}) so "
                "that at least one layer is MoE; use router_type='dense' for a model without experts"
            )
        if not math.isfinite(self.l1_coef_multiplier) or self.l1_coef_multiplier <= 1:
            raise ValueError(f"`l1_coef_multiplier` must be a finite number > 1, got {self.l1_coef_multiplier}")
        for name in ("l1_coef_init", "router_aux_loss_coef", "initializer_range"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
        if not 0 <= self.attention_dropout < 1:  # also refuses NaN
            raise ValueError(f"`attention_dropout` must be a number in [0, 1), got {self.attention_dropout}")

    def _check_rope_parameters(self) -> None:
        """`rope_parameters`: a RoPE type the model computes and a finite `rope_theta` > 0."""
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            return  # None: Transformers' defaults (`default_theta`) apply
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in rope_types():
            raise ValueError(f"`rope_parameters['rope_type']` must be one of {rope_types()}, got {rope_type!r}")
        theta = rope.get("rope_theta")
        if theta is not None and (
            isinstance(theta, bool) or not isinstance(theta, int | float) or not math.isfinite(theta) or theta <= 0
        ):
            raise ValueError(f"`rope_parameters['rope_theta']` must be a finite number > 0, got {theta!r}")

    def _check_token_ids(self) -> None:
        """`pad_token_id`, `bos_token_id`, `eos_token_id` (an id or a list of ids): None or ids in [0, vocab_size)."""
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name, None)
            for token_id in value if isinstance(value, list) else [value]:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(
                        f"`{name}` must be None or a token id in [0, vocab_size={self.vocab_size}), got {value}"
                    )

    @property
    def num_routed_experts(self) -> int:
        """Experts per MoE layer after the granularity split (`E * G`)."""
        return self.num_experts * self.granularity

    @property
    def expert_intermediate_size(self) -> int:
        """FFN width of one (fine-grained) expert."""
        return self.intermediate_size // self.granularity

    @property
    def routed_top_k(self) -> int:
        """Experts per token for TopK routing (`k * G`)."""
        return self.num_experts_per_tok * self.granularity

    @property
    def target_sparsity(self) -> float:
        """ReMoE's sparsity target `1 - k / E`."""
        return 1.0 - self.num_experts_per_tok / self.num_experts

    @property
    def has_experts(self) -> bool:
        """Whether the model has routed MoE layers (every router type but `"dense"`)."""
        return self.router_type != "dense"

    @property
    def uses_l1_controller(self) -> bool:
        """Whether training adds ReMoE's L1 regulariser, scaled by the controller's adaptive lambda (ReLU routing)."""
        return self.router_type == "relu"

    @property
    def segment_length(self) -> int:
        """Lory's segment length: `router_segment_length`, by default 256 but at most `max_position_embeddings // 4`."""
        if self.router_segment_length is not None:
            return self.router_segment_length
        return max(1, min(256, self.max_position_embeddings // 4))

    @property
    def uses_balancing_loss(self) -> bool:
        """Whether training adds the Switch balancing loss, scaled by `router_aux_loss_coef` (TopK, SparseMixer-v2)."""
        return self.router_type in BALANCING_LOSS_ROUTER_TYPES

    @property
    def num_moe_layers(self) -> int:
        """Decoder layers with an MoE FFN."""
        return sum(self.is_moe_layer(layer_idx) for layer_idx in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has an MoE FFN."""
        return self.has_experts and (layer_idx + 1) % self.moe_layer_freq == 0


__all__ = ["ReMoEConfig"]

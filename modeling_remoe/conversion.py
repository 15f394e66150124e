"""Build ReMoE checkpoints from other checkpoints.

- `btx_mix`: Branch-Train-MiX. N dense checkpoints (Llama, Mistral, Qwen2 or dense ReMoE) become one MoE: the FFN of
  every layer of source i becomes expert i (optionally cut into `split` finer experts), attention, norms, embeddings and
  LM head are averaged (or taken from a base), and a new ReLU or TopK router is initialised.
- `upcycle`: sparse upcycling of one dense checkpoint into E experts (copies, optionally with noise, or a split).
- `to_dense_remoe`: a Llama / Mistral / Qwen2 checkpoint as a dense ReMoE checkpoint (same function).
- `convert_moe`: a TopK MoE (Mixtral, or a ReMoE TopK/ReLU checkpoint) into ReMoE with ReLU or TopK routing.

Every function reads its sources tensor by tensor through `safetensors.safe_open` (memory-mapped, shard by shard),
checks the architectures, tensor names and shapes of all sources and of the result before writing anything, and writes
a normal ReMoE checkpoint (safetensors shards, config with `auto_map`, the remote-code files, the first source's
tokenizer and generation config) into a temporary folder that is renamed into place at the end. Peak memory is about
one output shard plus one layer's tensors of the sources.

This module imports `modeling_remoe.py`, never the reverse: the remote-code files stay self-contained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from .checkpoints import SAFETENSORS_DTYPES, SafetensorsCheckpoint, check_weights_match, expected_tensor_shapes
from .configuration_remoe import ReMoEConfig
from .modeling_remoe import ReMoEForCausalLM

logger = logging.getLogger(__name__)

DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "remoe")
MOE_MODEL_TYPES = ("mixtral", "remoe")
# MoE families whose layout ReMoE cannot represent exactly, with the reason.
UNSUPPORTED_MOE_MODEL_TYPES = {
    "qwen3_moe": "its attention has per-head RMSNorm on queries and keys (q_norm/k_norm), which ReMoE does not have",
    "olmoe": "its attention has RMSNorm on queries and keys (q_norm/k_norm), which ReMoE does not have",
    "qwen2_moe": "it has a shared expert with a sigmoid gate next to the routed experts, which ReMoE does not have",
}
MIX_ROUTER_TYPES = ("relu", "topk")
SHARED_MODES = ("average", "base")
ROUTER_INITS = ("random", "centroid")
UPCYCLE_MODES = ("copy", "split")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
CONVERSION_INFO_FILE = "remoe_conversion.json"
# ReMoE fields that a conversion may set on top of the architecture (the controller and TopK loss settings).
CONTROLLER_FIELDS = ("l1_coef_init", "l1_coef_multiplier", "load_balance", "router_aux_loss_coef")


@contextmanager
def _open_checkpoints(paths: Sequence[str | os.PathLike]) -> Iterator[list[SafetensorsCheckpoint]]:
    with ExitStack() as stack:
        checkpoints = []
        for path in paths:
            checkpoint = SafetensorsCheckpoint(path)
            stack.callback(checkpoint.close)
            checkpoints.append(checkpoint)
        yield checkpoints


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The parts of a decoder that must agree between merged checkpoints and that the ReMoE config needs.

    `ffn_size` is the width of one layer's FFN for dense models and of one expert for MoE models.
    `attention_bias` is `"none"`, `"qkv"` (Qwen2: q, k, v have a bias, o has none) or `"all"`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_parameters: dict
    max_position_embeddings: int
    attention_bias: str
    tie_word_embeddings: bool
    num_experts: int = 0  # 0: dense
    num_experts_per_tok: int = 0
    moe_layout: str = ""  # MoE sources: "mixtral" (per-expert tensors), "mixtral_fused" (Transformers v5) or "remoe"

    def describe_difference(self, other: Architecture) -> list[str]:
        return [
            f"{field.name}={getattr(self, field.name)!r} vs {getattr(other, field.name)!r}"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]


def _common_fields(config, path: Path) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        raise ValueError(f"{str(path)!r}: the config has no rope_parameters")
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _warn_sliding_window(config, path: Path) -> None:
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) and window is not None
    if uses_window and window < config.max_position_embeddings:
        logger.warning(
            "%s uses sliding-window attention (window %d); ReMoE attends to the full context, so outputs agree only "
            "for sequences of at most %d tokens",
            path,
            window,
            window,
        )


def read_architecture(checkpoint: SafetensorsCheckpoint) -> Architecture:
    """Parse a checkpoint's config (through `AutoConfig`, so legacy fields are normalised) into an `Architecture`."""
    path, model_type = checkpoint.path, checkpoint.model_type
    if model_type in UNSUPPORTED_MOE_MODEL_TYPES:
        raise ValueError(
            f"{str(path)!r}: model_type {model_type!r} cannot be converted to ReMoE: "
            f"{UNSUPPORTED_MOE_MODEL_TYPES[model_type]}"
        )
    if model_type not in (*DENSE_MODEL_TYPES, *MOE_MODEL_TYPES):
        raise ValueError(
            f"{str(path)!r}: model_type {model_type!r} is not supported; dense sources: {', '.join(DENSE_MODEL_TYPES)} "
            f"(ReMoE with router_type='dense'), MoE sources: {', '.join(MOE_MODEL_TYPES)}"
        )
    config = AutoConfig.from_pretrained(path)
    fields = _common_fields(config, path)
    if model_type == "remoe":
        bias = "all" if config.attention_bias else "none"
        if config.router_type == "dense":
            return Architecture(
                **fields, ffn_size=config.intermediate_size * config.num_experts_per_tok, attention_bias=bias
            )
        return Architecture(
            **fields,
            ffn_size=config.expert_intermediate_size,
            attention_bias=bias,
            num_experts=config.num_routed_experts,
            num_experts_per_tok=config.routed_top_k,
            moe_layout="remoe",
        )
    if model_type == "llama":
        if getattr(config, "mlp_bias", False):
            raise ValueError(f"{str(path)!r}: mlp_bias=True is not supported (ReMoE's FFNs have no bias)")
        return Architecture(
            **fields, ffn_size=config.intermediate_size, attention_bias="all" if config.attention_bias else "none"
        )
    _warn_sliding_window(config, path)
    if model_type == "mistral":
        return Architecture(**fields, ffn_size=config.intermediate_size, attention_bias="none")
    if model_type == "qwen2":
        return Architecture(**fields, ffn_size=config.intermediate_size, attention_bias="qkv")
    # mixtral: original per-expert tensors (`block_sparse_moe.experts.N.w1`) or the fused Transformers v5 layout
    layout = "mixtral" if "model.layers.0.block_sparse_moe.gate.weight" in checkpoint else "mixtral_fused"
    return Architecture(
        **fields,
        ffn_size=config.intermediate_size,
        attention_bias="none",
        num_experts=config.num_local_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_layout=layout,
    )


def _attention_shapes(arch: Architecture, layer: int) -> dict[str, tuple[int, ...]]:
    prefix, hidden = f"model.layers.{layer}.", arch.hidden_size
    q_size, kv_size = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    shapes = {
        f"{prefix}self_attn.q_proj.weight": (q_size, hidden),
        f"{prefix}self_attn.k_proj.weight": (kv_size, hidden),
        f"{prefix}self_attn.v_proj.weight": (kv_size, hidden),
        f"{prefix}self_attn.o_proj.weight": (hidden, q_size),
        f"{prefix}input_layernorm.weight": (hidden,),
        f"{prefix}post_attention_layernorm.weight": (hidden,),
    }
    if arch.attention_bias in ("qkv", "all"):
        shapes[f"{prefix}self_attn.q_proj.bias"] = (q_size,)
        shapes[f"{prefix}self_attn.k_proj.bias"] = (kv_size,)
        shapes[f"{prefix}self_attn.v_proj.bias"] = (kv_size,)
    if arch.attention_bias == "all":
        shapes[f"{prefix}self_attn.o_proj.bias"] = (hidden,)
    return shapes


def _ffn_shapes(arch: Architecture, layer: int) -> dict[str, tuple[int, ...]]:
    prefix, hidden, ffn, experts = f"model.layers.{layer}.", arch.hidden_size, arch.ffn_size, arch.num_experts
    if arch.moe_layout == "":
        return {
            f"{prefix}mlp.gate_proj.weight": (ffn, hidden),
            f"{prefix}mlp.up_proj.weight": (ffn, hidden),
            f"{prefix}mlp.down_proj.weight": (hidden, ffn),
        }
    if arch.moe_layout == "mixtral":
        moe = f"{prefix}block_sparse_moe."
        shapes = {f"{moe}gate.weight": (experts, hidden)}
        for expert in range(experts):
            shapes[f"{moe}experts.{expert}.w1.weight"] = (ffn, hidden)
            shapes[f"{moe}experts.{expert}.w2.weight"] = (hidden, ffn)
            shapes[f"{moe}experts.{expert}.w3.weight"] = (ffn, hidden)
        return shapes
    return {  # the fused Transformers v5 layout
        f"{prefix}mlp.gate.weight": (experts, hidden),
        f"{prefix}mlp.experts.gate_up_proj": (experts, 2 * ffn, hidden),
        f"{prefix}mlp.experts.down_proj": (experts, hidden, ffn),
    }


def expected_source_shapes(arch: Architecture) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(required tensor shapes, optional tensor names) of a checkpoint with this architecture."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size),
        "model.norm.weight": (arch.hidden_size,),
        "lm_head.weight": (arch.vocab_size, arch.hidden_size),
    }
    optional: set[str] = set()
    if arch.tie_word_embeddings:
        optional.add("lm_head.weight")
    for layer in range(arch.num_hidden_layers):
        shapes.update(_attention_shapes(arch, layer))
        shapes.update(_ffn_shapes(arch, layer))
    return shapes, optional


def check_source_tensors(checkpoint: SafetensorsCheckpoint, arch: Architecture) -> None:
    """Raise `ValueError` unless the checkpoint holds exactly the tensors (names and shapes) its config implies."""
    if arch.model_type == "remoe":  # any ReMoE layout (dense, MoE, moe_layer_freq): the model itself says
        shapes, optional = expected_tensor_shapes(ReMoEConfig.from_pretrained(checkpoint.path))
    else:
        shapes, optional = expected_source_shapes(arch)
    where = f"{str(checkpoint.path)!r} ({arch.model_type})"
    unexpected = sorted(checkpoint.keys() - set(shapes))
    if unexpected and arch.model_type != "remoe":
        raise ValueError(
            f"{where} has {len(unexpected)} tensors that ReMoE cannot represent, e.g. {unexpected[:3]}; "
            "only Llama-style decoders convert"
        )
    check_weights_match(checkpoint, shapes, optional, where)


# ----------------------------------------------------------------------------------------------------------------------
# Writing a ReMoE checkpoint
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PlannedTensor:
    """One output tensor: its name, shape and a function that computes it (run only once every check has passed)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    dtype: torch.dtype | None = None  # None: the checkpoint dtype


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as `"5GB"`, `"500MB"`, `"2GiB"`."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must be a number of bytes or like '5GB', got {size!r}")
    base = 1024 if match.group(3) == "IB" else 1000
    return int(float(match.group(1)) * base ** " KMGT".index(match.group(2) or " "))


def _resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return resolved


def _check_output_dir(output_dir: Path, sources: Sequence[Path], overwrite: bool) -> None:
    resolved = output_dir.resolve()
    for source in sources:
        if source.resolve() == resolved:
            raise ValueError(f"output_dir {str(output_dir)!r} is one of the sources")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ValueError(f"output_dir {str(output_dir)!r} exists and is not empty (pass overwrite=True / --overwrite)")


def _meta_model(config: ReMoEConfig) -> ReMoEForCausalLM:
    with torch.device("meta"):
        return ReMoEForCausalLM(config)


def _check_plan(plan: list[_PlannedTensor], model: ReMoEForCausalLM) -> None:
    """The planned tensors must be exactly the model's state dict (tied LM head left out)."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    planned = {entry.name: entry.shape for entry in plan}
    if planned != expected:
        missing, extra = sorted(set(expected) - set(planned)), sorted(set(planned) - set(expected))
        wrong = sorted(n for n in set(planned) & set(expected) if planned[n] != expected[n])
        raise RuntimeError(
            f"conversion plan does not match ReMoE: missing {missing[:3]}, extra {extra[:3]}, {wrong[:3]}"
        )


def _copy_side_files(first_source: Path, folder: Path, config: ReMoEConfig) -> None:
    for name in TOKENIZER_FILES:
        if (first_source / name).is_file():
            shutil.copyfile(first_source / name, folder / name)
    if (first_source / "generation_config.json").is_file():
        shutil.copyfile(first_source / "generation_config.json", folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)


_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class _StreamingSafetensorsWriter:
    """Writes planned tensors straight into safetensors shards, one tensor at a time.

    Names, shapes and dtypes are known before any tensor is computed, so every shard's header (with the byte offsets)
    is written first and each tensor's bytes are appended as soon as it is computed: no shard is ever held in memory.
    """

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], shard_limit: int):
        self.folder = folder
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in entries:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and shard_bytes + size > shard_limit:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, shape, dtype, size))
            shard_bytes += size
        count = len(shards)
        self.filenames = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self.shards = shards
        self.location = {entry[0]: index for index, shard in enumerate(shards) for entry in shard}
        self.total_bytes = sum(entry[3] for shard in shards for entry in shard)
        self._expected: list[str] = []
        self._shard = -1
        self._handle = None

    def _open_shard(self, index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, size in self.shards[index]:
            header[name] = {
                "dtype": _SAFETENSORS_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self.folder / self.filenames[index], "wb")  # noqa: SIM115 (closed in close())
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)
        self._expected = [entry[0] for entry in self.shards[index]]
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._shard != self.location[name]:
            self._open_shard(self.location[name])
        if not self._expected or self._expected.pop(0) != name:
            raise RuntimeError(f"{name} written out of plan order")
        self._handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.filenames) > 1:
            weight_map = {name: self.filenames[index] for name, index in sorted(self.location.items())}
            index_json = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def _write_checkpoint(
    plan: list[_PlannedTensor],
    config: ReMoEConfig,
    output_dir: Path,
    *,
    dtype: torch.dtype,
    sources: Sequence[SafetensorsCheckpoint],
    first_source: Path,
    info: dict[str, Any],
    max_shard_size: int | str,
    overwrite: bool,
    description: str,
) -> Path:
    """Compute the planned tensors one by one and stream them into safetensors shards; add config, code, tokenizer.

    The sources' memory maps are released after every tensor, so resident memory stays near the largest tensor being
    computed (one layer's experts) instead of growing with every source page read.
    """
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = ["ReMoEForCausalLM"]
    model = _meta_model(config)
    _check_plan(plan, model)
    shard_limit = parse_size(max_shard_size)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        writer = _StreamingSafetensorsWriter(
            tmp, [(entry.name, entry.shape, entry.dtype or dtype) for entry in plan], shard_limit
        )
        try:
            for entry in tqdm(plan, desc=description, unit="tensor"):
                tensor = entry.make().to(entry.dtype or dtype)
                if tuple(tensor.shape) != entry.shape:
                    raise RuntimeError(f"{entry.name}: computed shape {tuple(tensor.shape)}, planned {entry.shape}")
                writer.write(entry.name, tensor)
                del tensor
                for source in sources:
                    source.close()
        finally:
            writer.close()

        custom_object_save(model, tmp, config=config)  # modeling_remoe.py + configuration_remoe.py, auto_map
        config.save_pretrained(tmp)
        _copy_side_files(first_source, tmp, config)
        (tmp / CONVERSION_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        if output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s (%.1f MB)", output_dir, writer.total_bytes / 1e6)
    return output_dir


def _remoe_config(arch: Architecture, source_config: dict[str, Any], **fields: Any) -> ReMoEConfig:
    """A ReMoE config with the source's attention/embedding architecture and the given MoE fields."""
    values = {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "hidden_act": arch.hidden_act,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_parameters": dict(arch.rope_parameters),
        "attention_bias": arch.attention_bias != "none",
        "tie_word_embeddings": arch.tie_word_embeddings,
        "initializer_range": source_config.get("initializer_range", 0.02),
        "bos_token_id": source_config.get("bos_token_id"),
        "eos_token_id": source_config.get("eos_token_id"),
        "pad_token_id": source_config.get("pad_token_id"),
    }
    values.update(fields)
    return ReMoEConfig(**values)


def _controller_fields(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(CONTROLLER_FIELDS))
    if unknown:
        raise ValueError(f"unknown ReMoE config fields {unknown}; a conversion may set {list(CONTROLLER_FIELDS)}")
    return {name: value for name, value in options.items() if value is not None}


def _shared_plan(arch: Architecture, sources: list[SafetensorsCheckpoint], layer: int | None) -> list[_PlannedTensor]:
    """Attention, norms (one layer) or embeddings/final norm/LM head (layer None) as the mean over `sources`.

    A Qwen2-style source (no o_proj bias) gets a zero o_proj bias, since ReMoE's `attention_bias` covers q, k, v and o.
    """
    if layer is None:
        shapes = {"model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size)}
        shapes["model.norm.weight"] = (arch.hidden_size,)
        if not arch.tie_word_embeddings:
            shapes["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    else:
        shapes = _attention_shapes(arch, layer)
    entries = [_PlannedTensor(name, shape, _mean_of(sources, name)) for name, shape in shapes.items()]
    if layer is not None and arch.attention_bias == "qkv":
        name = f"model.layers.{layer}.self_attn.o_proj.bias"
        entries.append(_PlannedTensor(name, (arch.hidden_size,), lambda: torch.zeros(arch.hidden_size)))
    return entries


def _mean_of(sources: list[SafetensorsCheckpoint], name: str) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        if len(sources) == 1:
            return sources[0].get(name)
        total = sources[0].get(name).to(torch.float32)
        for source in sources[1:]:
            total += source.get(name).to(torch.float32)
        return total / len(sources)

    return make


# ----------------------------------------------------------------------------------------------------------------------
# Router initialisation
# ----------------------------------------------------------------------------------------------------------------------


def _random_router(num_experts: int, hidden_size: int, std: float, seed: int, layer: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.randn(num_experts, hidden_size, generator=generator) * std


@torch.no_grad()
def hidden_state_centroids(
    model_path: str | os.PathLike,
    texts: Sequence[Sequence[str]],
    *,
    tokenizer_path: str | os.PathLike | None = None,
    max_tokens: int = 4096,
    block_size: int = 256,
) -> torch.Tensor:
    """Mean FFN input (the post-attention-norm hidden state) of every layer, per group of texts: (groups, L, H), fp32.

    Runs the model at `model_path` (any causal LM whose decoder layers are `model.model.layers[i].mlp`) on at most
    `max_tokens` tokens of each group.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_path = tokenizer_path or model_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"centroid router init needs a tokenizer in {str(tokenizer_path)!r}: {error}") from error
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")  # sums are accumulated in float64
    model.eval()
    layers = model.model.layers
    hidden = model.config.hidden_size
    block_size = min(block_size, model.config.max_position_embeddings)
    sums = torch.zeros(len(texts), len(layers), hidden, dtype=torch.float64)
    counts = torch.zeros(len(texts), dtype=torch.float64)
    group = 0

    def capture(layer_idx: int):
        def hook(module, args):
            sums[group, layer_idx] += args[0].reshape(-1, hidden).to(torch.float64).sum(dim=0)

        return hook

    handles = [layer.mlp.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        for group, group_texts in enumerate(tqdm(texts, desc="Router centroids", unit="group")):
            ids: list[int] = []
            for text in group_texts:
                ids += tokenizer(text, add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
                if len(ids) >= max_tokens:
                    break
            ids = ids[:max_tokens]
            if not ids:
                raise ValueError(f"centroid router init: text group {group} is empty")
            for start in range(0, len(ids), block_size):
                block = torch.tensor([ids[start : start + block_size]])
                model(block, use_cache=False)
                counts[group] += block.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return (sums / counts[:, None, None]).to(torch.float32)


def centroid_router(domain_centroids: torch.Tensor, generalist: torch.Tensor | None = None) -> torch.Tensor:
    """Router rows (experts, H) for one layer from the mean hidden state of each expert's domain.

    Expert i's row points along its domain's deviation from the mean of the domains, scaled so that its logit on its
    own domain's mean hidden state is `target` (1, or 0.5 when a generalist shares the work): ReLU gates start active
    for the expert's own domain and mostly inactive for the others. A generalist (the seed) row points along the mean
    of all domains with the same own-mean logit, so it starts active for every token.
    """
    target = 1.0 if generalist is None else 0.5
    mean = domain_centroids.mean(dim=0)
    rows = []
    for centroid in domain_centroids:
        direction = centroid - mean if len(domain_centroids) > 1 else centroid
        direction = direction / direction.norm().clamp_min(1e-12)
        projection = direction @ centroid
        if projection <= 1e-6 * centroid.norm():  # degenerate: fall back to the centroid's own direction
            direction, projection = centroid / centroid.norm().clamp_min(1e-12), centroid.norm()
        rows.append(direction * (target / projection.clamp_min(1e-12)))
    if generalist is not None:
        rows.append(generalist * (target / (generalist @ generalist).clamp_min(1e-12)))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------------
# Branch-Train-MiX
# ----------------------------------------------------------------------------------------------------------------------


def _check_dense(arch: Architecture, path: Path, what: str) -> None:
    if arch.moe_layout:
        raise ValueError(
            f"{what} {str(path)!r} is an MoE checkpoint ({arch.model_type}, {arch.num_experts} experts); "
            "it takes dense checkpoints (use convert_moe / `remoe convert` for MoE checkpoints)"
        )


def _check_same_architecture(archs: list[Architecture], paths: list[Path]) -> None:
    for arch, path in zip(archs[1:], paths[1:], strict=True):
        differences = archs[0].describe_difference(arch)
        if differences:
            raise ValueError(
                f"sources must share one architecture; {str(paths[0])!r} and {str(path)!r} differ: "
                f"{'; '.join(differences)}. (A Llama/Mistral/Qwen2 seed is first converted to a dense ReMoE "
                "checkpoint by `remoe convert` / `remoe btx branch`: mix the converted seed.)"
            )


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def btx_mix(
    sources: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    seed_model: str | os.PathLike | None = None,
    seed_as_expert: bool = False,
    router_type: str = "relu",
    num_experts_per_tok: int = 2,
    shared: str = "average",
    router_init: str = "random",
    router_texts: Sequence[Sequence[str]] | None = None,
    router_max_tokens: int = 4096,
    split: int = 1,
    expert_names: Sequence[str] | None = None,
    router_std: float | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **controller: Any,
) -> Path:
    """Merge dense checkpoints (one per domain) into a ReMoE MoE checkpoint (Branch-Train-MiX).

    Args:
        sources: dense checkpoint folders (Llama, Mistral, Qwen2 or dense ReMoE, one architecture); the FFN of each
            layer of source i becomes expert i.
        output_dir: where the ReMoE checkpoint is written (must not exist or be empty unless `overwrite`).
        seed_model: the seed the sources were branched from; with `seed_as_expert` it becomes a generalist expert
            (the last one). It is also the base for `shared="base"` and the model that `router_init="centroid"` runs.
        router_type: `"relu"` (ReMoE, sparsity target `1 - k/E`) or `"topk"`.
        num_experts_per_tok: k (TopK's experts per token, ReMoE's target).
        shared: `"average"`: attention, norms, embeddings and LM head are the mean of the expert sources;
            `"base"`: copied from `seed_model` (or the first source).
        router_init: `"random"` (normal, std `router_std`, default the source's `initializer_range`) or `"centroid"`:
            from the mean hidden state of each domain's `router_texts` (one list of texts per source), see
            `centroid_router`; at most `router_max_tokens` tokens of each list are used.
        split: cut every FFN into `split` experts of width `ffn/split` (the granularity of the result).
        expert_names: one name per source (default: folder names), written to `remoe_conversion.json`.
        dtype: dtype of the result (default: the first source's).
        controller: `l1_coef_init`, `l1_coef_multiplier`, `load_balance`, `router_aux_loss_coef` of the result.

    Returns the output folder. Raises `ValueError` (before writing) for bad options or mismatched sources.
    """
    source_paths = [Path(p) for p in sources]
    seed_path = Path(seed_model) if seed_model is not None else None
    output_dir = Path(output_dir)
    if len(source_paths) < 1 or len(source_paths) + int(seed_as_expert) < 2:
        raise ValueError("btx mix needs at least 2 experts (sources, plus the seed with seed_as_expert)")
    if seed_as_expert and seed_path is None:
        raise ValueError("seed_as_expert needs seed_model")
    if router_type not in MIX_ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {MIX_ROUTER_TYPES}, got {router_type!r}")
    if shared not in SHARED_MODES:
        raise ValueError(f"shared must be one of {SHARED_MODES}, got {shared!r}")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
    if router_init == "centroid" and (router_texts is None or len(router_texts) != len(source_paths)):
        raise ValueError(
            f"router_init='centroid' needs router_texts: one list of texts per source ({len(source_paths)}), "
            f"got {0 if router_texts is None else len(router_texts)}"
        )
    if expert_names is not None and len(expert_names) != len(source_paths):
        raise ValueError(f"expert_names needs one name per source ({len(source_paths)}), got {len(expert_names)}")
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be an integer >= 1, got {split!r}")
    controller = _controller_fields(controller)
    all_paths = source_paths + ([seed_path] if seed_path is not None else [])
    _check_output_dir(output_dir, all_paths, overwrite)

    with _open_checkpoints(all_paths) as checkpoints:
        archs = [read_architecture(checkpoint) for checkpoint in checkpoints]
        for arch, path in zip(archs, all_paths, strict=True):
            _check_dense(arch, path, "btx mix source" if path != seed_path else "seed_model")
        _check_same_architecture(archs, all_paths)
        for checkpoint, arch in zip(checkpoints, archs, strict=True):
            check_source_tensors(checkpoint, arch)
        arch = archs[0]
        if arch.ffn_size % split:
            raise ValueError(f"split={split} must divide the FFN width {arch.ffn_size}")

        expert_sources = checkpoints[: len(source_paths)]
        seed_checkpoint = checkpoints[-1] if seed_path is not None else None
        if seed_as_expert:
            expert_sources = [*expert_sources, seed_checkpoint]
        names = list(expert_names or [p.name for p in source_paths]) + (["seed"] if seed_as_expert else [])
        names = _unique_names(names)
        num_experts = len(expert_sources)
        config = _remoe_config(
            arch,
            checkpoints[0].config_dict,
            intermediate_size=arch.ffn_size,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            granularity=split,
            router_type=router_type,
            moe_layer_freq=1,
            **controller,
        )
        out_dtype = _resolve_dtype(dtype, checkpoints[0].dtype("model.embed_tokens.weight"))
        shared_sources = expert_sources if shared == "average" else [seed_checkpoint or checkpoints[0]]
        std = router_std if router_std is not None else config.initializer_range

        centroid_rows: torch.Tensor | None = None
        if router_init == "centroid":
            groups = [list(texts) for texts in router_texts]
            if seed_as_expert:
                groups.append([text for texts in router_texts for text in texts])
            reference = seed_path or source_paths[0]
            centroids = hidden_state_centroids(reference, groups, max_tokens=router_max_tokens)  # (groups, L, H)
            domain = centroids[: len(source_paths)]
            generalist = centroids[-1] if seed_as_expert else None
            centroid_rows = torch.stack(
                [
                    centroid_router(domain[:, layer], None if generalist is None else generalist[layer])
                    for layer in range(arch.num_hidden_layers)
                ]
            )  # (L, experts, H)

        plan = _shared_plan(arch, shared_sources, None)
        chunk = arch.ffn_size // split
        for layer in range(arch.num_hidden_layers):
            plan += _shared_plan(arch, shared_sources, layer)
            prefix = f"model.layers.{layer}.mlp."

            def router(layer: int = layer) -> torch.Tensor:
                if centroid_rows is not None:
                    return centroid_rows[layer].repeat_interleave(split, dim=0)
                return _random_router(num_experts * split, arch.hidden_size, std, seed, layer)

            def gate_up(prefix: str = prefix) -> torch.Tensor:
                experts = []
                for source in expert_sources:
                    gate, up = source.get(f"{prefix}gate_proj.weight"), source.get(f"{prefix}up_proj.weight")
                    experts += [torch.cat([g, u]) for g, u in zip(gate.split(chunk), up.split(chunk), strict=True)]
                return torch.stack(experts)

            def down(prefix: str = prefix) -> torch.Tensor:
                experts = []
                for source in expert_sources:
                    experts += list(source.get(f"{prefix}down_proj.weight").split(chunk, dim=1))
                return torch.stack(experts)

            routed = num_experts * split
            plan += [
                _PlannedTensor(f"{prefix}router.weight", (routed, arch.hidden_size), router),
                _PlannedTensor(f"{prefix}experts.gate_up_proj", (routed, 2 * chunk, arch.hidden_size), gate_up),
                _PlannedTensor(f"{prefix}experts.down_proj", (routed, arch.hidden_size, chunk), down),
            ]
        plan.append(_controller_entry(config))

        info = {
            "method": "btx_mix",
            "sources": [str(p) for p in source_paths],
            "seed_model": str(seed_path) if seed_path is not None else None,
            "experts": [
                {"name": name, "source": str(source.path), "routed_experts": list(range(i * split, (i + 1) * split))}
                for i, (name, source) in enumerate(zip(names, expert_sources, strict=True))
            ],
            "shared": shared,
            "router_init": router_init,
            "split": split,
        }
        return _write_checkpoint(
            plan,
            config,
            output_dir,
            dtype=out_dtype,
            sources=checkpoints,
            first_source=source_paths[0],
            info=info,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            description="btx mix",
        )


def _controller_entry(config: ReMoEConfig) -> _PlannedTensor:
    value = torch.tensor(config.l1_coef_init, dtype=torch.float32)
    return _PlannedTensor("controller.l1_coef", (), lambda: value, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Sparse upcycling and dense conversion
# ----------------------------------------------------------------------------------------------------------------------


def upcycle(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    num_experts: int,
    granularity: int = 1,
    mode: str = "copy",
    router_type: str = "relu",
    num_experts_per_tok: int = 1,
    noise: float = 0.0,
    router_std: float | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **controller: Any,
) -> Path:
    """Sparse upcycling: one dense checkpoint becomes a ReMoE MoE with `num_experts` experts per layer.

    `mode="copy"`: every expert is a copy of the FFN (width `ffn`), each cut into `granularity` chunks, plus Gaussian
    noise of `noise` times each weight's standard deviation. With gates summing to 1 over the copies the MoE computes
    the dense FFN. `mode="split"`: the FFN is cut into `num_experts * granularity` chunks, one per routed expert
    (`intermediate_size = ffn / num_experts`); with every gate at 1 the MoE computes the dense FFN.
    The router is random (normal, std `router_std`, default the source's `initializer_range`); attention, norms and
    embeddings are copied.
    """
    source_path, output_dir = Path(source), Path(output_dir)
    if mode not in UPCYCLE_MODES:
        raise ValueError(f"mode must be one of {UPCYCLE_MODES}, got {mode!r}")
    if router_type not in MIX_ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {MIX_ROUTER_TYPES}, got {router_type!r}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity must be an integer >= 1, got {granularity!r}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    controller = _controller_fields(controller)
    _check_output_dir(output_dir, [source_path], overwrite)

    with _open_checkpoints([source_path]) as (checkpoint,):
        arch = read_architecture(checkpoint)
        _check_dense(arch, source_path, "upcycle source")
        check_source_tensors(checkpoint, arch)
        pieces = num_experts * granularity if mode == "split" else granularity
        if arch.ffn_size % pieces:
            raise ValueError(f"{mode} into {pieces} chunks needs them to divide the FFN width {arch.ffn_size}")
        intermediate = arch.ffn_size // num_experts if mode == "split" else arch.ffn_size
        config = _remoe_config(
            arch,
            checkpoint.config_dict,
            intermediate_size=intermediate,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            granularity=granularity,
            router_type=router_type,
            moe_layer_freq=1,
            **controller,
        )
        out_dtype = _resolve_dtype(dtype, checkpoint.dtype("model.embed_tokens.weight"))
        std = router_std if router_std is not None else config.initializer_range
        routed, chunk = config.num_routed_experts, arch.ffn_size // pieces
        copies = num_experts if mode == "copy" else 1

        def noisy(weight: torch.Tensor, layer: int, which: int) -> torch.Tensor:
            """`copies` copies of `weight` (stacked on a new dim 0) with independent relative noise."""
            stacked = weight.unsqueeze(0).expand(copies, *weight.shape).to(torch.float32)
            if noise == 0:
                return stacked
            generator = torch.Generator().manual_seed((seed * 100_003 + layer) * 3 + which)
            scale = noise * weight.to(torch.float32).std()
            return stacked + torch.randn(stacked.shape, generator=generator) * scale

        plan = _shared_plan(arch, [checkpoint], None)
        for layer in range(arch.num_hidden_layers):
            plan += _shared_plan(arch, [checkpoint], layer)
            prefix = f"model.layers.{layer}.mlp."

            def gate_up(prefix: str = prefix, layer: int = layer) -> torch.Tensor:
                gate = noisy(checkpoint.get(f"{prefix}gate_proj.weight"), layer, 0)  # (copies, F, H)
                up = noisy(checkpoint.get(f"{prefix}up_proj.weight"), layer, 1)
                experts = [
                    torch.cat([g, u])
                    for c in range(copies)
                    for g, u in zip(gate[c].split(chunk), up[c].split(chunk), strict=True)
                ]
                return torch.stack(experts)

            def down(prefix: str = prefix, layer: int = layer) -> torch.Tensor:
                weight = noisy(checkpoint.get(f"{prefix}down_proj.weight"), layer, 2)  # (copies, H, F)
                return torch.stack([piece for c in range(copies) for piece in weight[c].split(chunk, dim=1)])

            def router(layer: int = layer) -> torch.Tensor:
                return _random_router(routed, arch.hidden_size, std, seed, layer)

            plan += [
                _PlannedTensor(f"{prefix}router.weight", (routed, arch.hidden_size), router),
                _PlannedTensor(f"{prefix}experts.gate_up_proj", (routed, 2 * chunk, arch.hidden_size), gate_up),
                _PlannedTensor(f"{prefix}experts.down_proj", (routed, arch.hidden_size, chunk), down),
            ]
        plan.append(_controller_entry(config))
        info = {"method": "upcycle", "source": str(source_path), "mode": mode, "noise": noise, "seed": seed}
        return _write_checkpoint(
            plan,
            config,
            output_dir,
            dtype=out_dtype,
            sources=[checkpoint],
            first_source=source_path,
            info=info,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            description="upcycle",
        )


def to_dense_remoe(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """A Llama / Mistral / Qwen2 checkpoint as a dense ReMoE checkpoint computing the same function
    (`router_type="dense"`, `num_experts=num_experts_per_tok=1`, `intermediate_size` = the FFN width), so that
    `remoe train --model_name_or_path` can continue it."""
    source_path, output_dir = Path(source), Path(output_dir)
    _check_output_dir(output_dir, [source_path], overwrite)
    with _open_checkpoints([source_path]) as (checkpoint,):
        arch = read_architecture(checkpoint)
        _check_dense(arch, source_path, "to_dense_remoe source")
        check_source_tensors(checkpoint, arch)
        config = _remoe_config(
            arch,
            checkpoint.config_dict,
            intermediate_size=arch.ffn_size,
            num_experts=1,
            num_experts_per_tok=1,
            router_type="dense",
        )
        out_dtype = _resolve_dtype(dtype, checkpoint.dtype("model.embed_tokens.weight"))
        plan = _shared_plan(arch, [checkpoint], None)
        for layer in range(arch.num_hidden_layers):
            plan += _shared_plan(arch, [checkpoint], layer)
            plan += [
                _PlannedTensor(name, shape, lambda name=name: checkpoint.get(name))
                for name, shape in _ffn_shapes(arch, layer).items()
            ]
        info = {"method": "to_dense_remoe", "source": str(source_path), "source_model_type": arch.model_type}
        return _write_checkpoint(
            plan,
            config,
            output_dir,
            dtype=out_dtype,
            sources=[checkpoint],
            first_source=source_path,
            info=info,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            description="to dense ReMoE",
        )


# ----------------------------------------------------------------------------------------------------------------------
# TopK MoE -> ReMoE
# ----------------------------------------------------------------------------------------------------------------------


def convert_moe(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    router_type: str = "relu",
    num_experts_per_tok: int | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **controller: Any,
) -> Path:
    """A Mixtral (original or fused tensor layout) or ReMoE MoE checkpoint as a ReMoE checkpoint.

    Experts, attention, norms and embeddings are kept. `router_type="topk"` keeps the source's behaviour (the router
    weights are copied and `router_renormalize` is set, as Mixtral renormalises its top-k weights).
    `router_type="relu"` switches ReLU routing and the L1 controller on for a short finetune: the router weights are
    reused minus their mean over the experts (the component a softmax ignores), so `ReLU(x W^T)` starts where the
    softmax router preferred an expert. `num_experts_per_tok` defaults to the source's k (ReMoE's target `1 - k/E`).
    """
    source_path, output_dir = Path(source), Path(output_dir)
    if router_type not in MIX_ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {MIX_ROUTER_TYPES}, got {router_type!r}")
    controller = _controller_fields(controller)
    _check_output_dir(output_dir, [source_path], overwrite)
    with _open_checkpoints([source_path]) as (checkpoint,):
        arch = read_architecture(checkpoint)
        if not arch.moe_layout:
            raise ValueError(
                f"convert_moe takes an MoE checkpoint; {str(source_path)!r} is dense ({arch.model_type}): "
                "use to_dense_remoe, upcycle or btx_mix"
            )
        check_source_tensors(checkpoint, arch)
        k = num_experts_per_tok if num_experts_per_tok is not None else arch.num_experts_per_tok
        extra: dict[str, Any] = {}
        if arch.moe_layout == "remoe":
            source_config = ReMoEConfig.from_pretrained(source_path)
            num_experts, granularity = source_config.num_experts, source_config.granularity
            intermediate, freq = source_config.intermediate_size, source_config.moe_layer_freq
            if num_experts_per_tok is None:
                k = source_config.num_experts_per_tok
            dense_width = intermediate * k
            # Routing settings of the source carry over when its router type is kept.
            if router_type == "topk":
                extra["router_aux_loss_coef"] = source_config.router_aux_loss_coef
            if router_type == source_config.router_type == "topk":
                extra["router_renormalize"] = source_config.router_renormalize
            if router_type == source_config.router_type == "relu":
                for name in ("l1_coef_init", "l1_coef_multiplier", "load_balance"):
                    extra[name] = getattr(source_config, name)
        else:
            num_experts, granularity, intermediate, freq = arch.num_experts, 1, arch.ffn_size, 1
            dense_width = None
            if router_type == "topk":
                extra["router_aux_loss_coef"] = checkpoint.config_dict.get("router_aux_loss_coef", 0.01)
                extra["router_renormalize"] = True  # Mixtral renormalises its top-k routing weights
        config = _remoe_config(
            arch,
            checkpoint.config_dict,
            intermediate_size=intermediate,
            num_experts=num_experts,
            num_experts_per_tok=k,
            granularity=granularity,
            router_type=router_type,
            moe_layer_freq=freq,
            **{**extra, **controller},
        )
        if freq > 1 and dense_width is not None and dense_width != intermediate * config.num_experts_per_tok:
            raise ValueError(
                f"num_experts_per_tok={k} would change the width of the dense layers of this ReMoE checkpoint "
                f"(moe_layer_freq={freq}); keep the source's k"
            )
        out_dtype = _resolve_dtype(dtype, checkpoint.dtype("model.embed_tokens.weight"))

        source_is_relu = checkpoint.config_dict.get("router_type") == "relu"

        def router_rows(weight: torch.Tensor) -> torch.Tensor:
            if router_type == "relu" and not source_is_relu:
                weight = weight.to(torch.float32)
                return weight - weight.mean(dim=0, keepdim=True)
            return weight

        plan = _shared_plan(arch, [checkpoint], None)
        for layer in range(arch.num_hidden_layers):
            plan += _shared_plan(arch, [checkpoint], layer)
            prefix = f"model.layers.{layer}."
            out = f"{prefix}mlp."
            if arch.moe_layout == "remoe" and not config.is_moe_layer(layer):
                plan += [
                    _PlannedTensor(name, checkpoint.shape(name), lambda name=name: checkpoint.get(name))
                    for name in (f"{out}gate_proj.weight", f"{out}up_proj.weight", f"{out}down_proj.weight")
                ]
                continue
            if arch.moe_layout == "mixtral":
                moe = f"{prefix}block_sparse_moe."

                def router(moe: str = moe) -> torch.Tensor:
                    return router_rows(checkpoint.get(f"{moe}gate.weight"))

                def gate_up(moe: str = moe) -> torch.Tensor:
                    return torch.stack(
                        [
                            torch.cat([checkpoint.get(f"{moe}experts.{e}.w{i}.weight") for i in (1, 3)])
                            for e in range(num_experts)
                        ]
                    )

                def down(moe: str = moe) -> torch.Tensor:
                    return torch.stack([checkpoint.get(f"{moe}experts.{e}.w2.weight") for e in range(num_experts)])

            else:
                router_name = f"{out}router.weight" if arch.moe_layout == "remoe" else f"{out}gate.weight"

                def router(router_name: str = router_name) -> torch.Tensor:
                    return router_rows(checkpoint.get(router_name))

                def gate_up(out: str = out) -> torch.Tensor:
                    return checkpoint.get(f"{out}experts.gate_up_proj")

                def down(out: str = out) -> torch.Tensor:
                    return checkpoint.get(f"{out}experts.down_proj")

            routed, width = config.num_routed_experts, config.expert_intermediate_size
            plan += [
                _PlannedTensor(f"{out}router.weight", (routed, arch.hidden_size), router),
                _PlannedTensor(f"{out}experts.gate_up_proj", (routed, 2 * width, arch.hidden_size), gate_up),
                _PlannedTensor(f"{out}experts.down_proj", (routed, arch.hidden_size, width), down),
            ]
        plan.append(_controller_entry(config))
        info = {
            "method": "convert_moe",
            "source": str(source_path),
            "source_model_type": arch.model_type,
            "router_type": router_type,
        }
        return _write_checkpoint(
            plan,
            config,
            output_dir,
            dtype=out_dtype,
            sources=[checkpoint],
            first_source=source_path,
            info=info,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            description="convert",
        )


def convert(
    source: str | os.PathLike, output_dir: str | os.PathLike, *, router_type: str | None = None, **kwargs: Any
) -> Path:
    """`remoe convert`: a dense Llama / Mistral / Qwen2 checkpoint becomes a dense ReMoE (`router_type` None or
    `"dense"`), an MoE checkpoint (Mixtral, ReMoE) a ReMoE with `router_type` (default `"relu"`)."""
    with _open_checkpoints([source]) as (checkpoint,):
        arch = read_architecture(checkpoint)
    if not arch.moe_layout:
        if router_type not in (None, "dense"):
            raise ValueError(
                f"{str(source)!r} is dense: convert writes a dense ReMoE (router_type 'dense'); "
                f"to build an MoE from it use `remoe upcycle`, got router_type={router_type!r}"
            )
        allowed = {"dtype", "max_shard_size", "overwrite"}
        ignored = sorted(name for name, value in kwargs.items() if name not in allowed and value is not None)
        if ignored:
            raise ValueError(f"{ignored} apply to MoE sources only; {str(source)!r} is dense")
        return to_dense_remoe(source, output_dir, **{k: v for k, v in kwargs.items() if k in allowed})
    return convert_moe(source, output_dir, router_type=router_type or "relu", **kwargs)


__all__ = [
    "Architecture",
    "SafetensorsCheckpoint",
    "btx_mix",
    "centroid_router",
    "convert",
    "convert_moe",
    "hidden_state_centroids",
    "read_architecture",
    "to_dense_remoe",
    "upcycle",
]

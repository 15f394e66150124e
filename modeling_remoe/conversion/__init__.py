"""Build ReMoE checkpoints from other checkpoints.

- `btx_mix` (`btx.py`): Branch-Train-MiX. N dense checkpoints (Llama, Mistral, Qwen2 or dense ReMoE) become one MoE:
  the FFN of every layer of source i becomes expert i (optionally cut into `split` finer experts), attention, norms,
  embeddings and LM head are averaged (or taken from a base), and a new ReLU or TopK router is initialised (TopK:
  BTX's `SoftMax(TopK(Wx))`, renormalised over the kept experts, unless `router_renormalize=False`).
- `upcycle` (`upcycle.py`): sparse upcycling of one dense checkpoint into E experts (copies, optionally with noise, or
  a split); `to_dense_remoe`: a Llama / Mistral / Qwen2 checkpoint as a dense ReMoE checkpoint (same function).
- `convert_moe` (`convert.py`): a TopK MoE (Mixtral, or a ReMoE TopK/ReLU checkpoint) into ReMoE with ReLU or TopK
  routing; `convert`: `remoe convert`, for dense and MoE sources.

The parts they share:

- `architecture.py`: `Architecture` and `read_architecture` (a source's config), the checks of a source's tensors.
- `layer_plan.py`: the result's `ReMoEConfig` and its tensor plan (shared tensors, each layer's router and experts).
- `routers.py`: router initialisation (random, or centroid: from each domain's mean hidden state).
- `writer.py`: planned tensors streamed into safetensors shards, config, code, tokenizer and `remoe_conversion.json`.

Every function reads its sources tensor by tensor through `safetensors.safe_open` (memory-mapped, shard by shard,
`remoe.checkpoints.SafetensorsCheckpoint`), checks the architectures, tensor names and shapes of all sources and of the
result before writing anything, and writes a normal ReMoE checkpoint (safetensors shards, config with `auto_map`, the
remote-code files, the first source's tokenizer and generation config) into a temporary folder that is renamed into
place at the end. Peak memory is about one output shard plus one layer's tensors of the sources.

This package imports `modeling_remoe.py`, never the reverse: the remote-code files stay self-contained.
"""

from ..checkpoints import SafetensorsCheckpoint
from .architecture import (
    DENSE_MODEL_TYPES,
    MOE_MODEL_TYPES,
    UNSUPPORTED_MOE_MODEL_TYPES,
    Architecture,
    check_source_tensors,
    expected_source_shapes,
    read_architecture,
)
from .btx import SHARED_MODES, MixOptions, btx_mix
from .convert import convert, convert_moe
from .layer_plan import CONTROLLER_FIELDS, MIX_ROUTER_TYPES
from .routers import ROUTER_INITS, centroid_router, hidden_state_centroids
from .upcycle import UPCYCLE_MODES, dense_remoe_config, to_dense_remoe, upcycle
from .writer import CONVERSION_INFO_FILE, TOKENIZER_FILES, OutputOptions, parse_size

__all__ = [
    "CONTROLLER_FIELDS",
    "CONVERSION_INFO_FILE",
    "DENSE_MODEL_TYPES",
    "MIX_ROUTER_TYPES",
    "MOE_MODEL_TYPES",
    "ROUTER_INITS",
    "SHARED_MODES",
    "TOKENIZER_FILES",
    "UNSUPPORTED_MOE_MODEL_TYPES",
    "UPCYCLE_MODES",
    "Architecture",
    "MixOptions",
    "OutputOptions",
    "SafetensorsCheckpoint",
    "btx_mix",
    "centroid_router",
    "check_source_tensors",
    "convert",
    "convert_moe",
    "dense_remoe_config",
    "expected_source_shapes",
    "hidden_state_centroids",
    "parse_size",
    "read_architecture",
    "to_dense_remoe",
    "upcycle",
]

"""ReMoE for Hugging Face Transformers: importing `remoe` registers `model_type="remoe"` with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from .configuration_remoe import ReMoEConfig
from .modeling_remoe import ReMoEForCausalLM, ReMoEModel, ReMoEPreTrainedModel

AutoConfig.register("remoe", ReMoEConfig, exist_ok=True)
AutoModel.register(ReMoEConfig, ReMoEModel, exist_ok=True)
AutoModelForCausalLM.register(ReMoEConfig, ReMoEForCausalLM, exist_ok=True)
# `register` reaches the Auto classes only. Transformers also reads these name tables to tell a base model from a
# causal LM: `Trainer`'s label smoothing shifts the labels of causal LMs, `transformers serve` and the model test
# suite pick the task by them.
MODEL_MAPPING_NAMES.setdefault("remoe", ReMoEModel.__name__)
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("remoe", ReMoEForCausalLM.__name__)

# `save_pretrained` then writes `auto_map` and copies the two model files, so checkpoints load with
# `trust_remote_code=True` where `remoe` is not installed.
ReMoEConfig.register_for_auto_class()
ReMoEModel.register_for_auto_class("AutoModel")
ReMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = ["ReMoEConfig", "ReMoEForCausalLM", "ReMoEModel", "ReMoEPreTrainedModel"]

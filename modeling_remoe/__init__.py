"""ReMoE for Hugging Face Transformers: importing `remoe` registers `model_type="remoe"` with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_remoe import ReMoEConfig
from .modeling_remoe import ReMoEForCausalLM, ReMoEModel, ReMoEPreTrainedModel

AutoConfig.register("remoe", ReMoEConfig, exist_ok=True)
AutoModel.register(ReMoEConfig, ReMoEModel, exist_ok=True)
AutoModelForCausalLM.register(ReMoEConfig, ReMoEForCausalLM, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the two model files, so checkpoints load with
# `trust_remote_code=True` where `remoe` is not installed.
ReMoEConfig.register_for_auto_class()
ReMoEModel.register_for_auto_class("AutoModel")
ReMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = ["ReMoEConfig", "ReMoEForCausalLM", "ReMoEModel", "ReMoEPreTrainedModel"]

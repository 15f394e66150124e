"""Training, data and analysis for ReMoE models (`remoe` CLI)."""

from .controller import ReMoEControllerCallback, add_controller_callback

__all__ = ["ReMoEControllerCallback", "add_controller_callback"]

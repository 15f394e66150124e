"""Model cards and Hub export for ReMoE checkpoints (rendered from the templates in this folder)."""

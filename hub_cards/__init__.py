"""Model cards and Hub export for ReMoE checkpoints (`remoe push`); imports the model package `remoe`, not
`remoe.training`.

- `push`: the `remoe push` command (`run`), and the names older code imports from it;
- `upload`: the repository folder (weights, config, tokenizer, metrics files, plots, analysis) and its upload;
- `card`: the model card, rendered from the folder's files with `templates/modelcard.md.j2`;
- `remote_code`: the check that the shipped `configuration_remoe.py` / `modeling_remoe.py` are model code only.

The JSON files the card reads are the records of `remoe.records`.
"""

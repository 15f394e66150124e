"""Datasets of remoe's local lm-eval tasks (`custom_dataset` hooks), built from the embedded corpus.

lm-eval loads this file by path (`!function remoe_utils.NAME` in the task YAMLs); the data itself is made by
`remoe.training.evaluation` from the held-out (validation) split of the embedded corpus, which is cached on first use.
"""

from remoe.training.evaluation import arithmetic_items, heldout_documents


def arith_dataset(**kwargs):
    return {"test": arithmetic_items()}


def code_dataset(**kwargs):
    return {"test": heldout_documents("code")}


def docs_dataset(**kwargs):
    return {"test": heldout_documents("docs")}

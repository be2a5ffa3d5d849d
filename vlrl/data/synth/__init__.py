"""The synthetic task world: perception, reasoning and text tasks at difficulty 1-5.

Public entry points: `make_dataset` (train + held-out eval files, PNGs, manifest),
`corpus_texts` (tokenizer corpus), `select` (a stage's slice of records) and the
task registry `TASKS`.
"""

from vlrl.data.synth.corpus import corpus_texts, glossary_texts
from vlrl.data.synth.select import select, select_indices
from vlrl.data.synth.tasks import DIFFICULTIES, FAMILIES, FAMILY_TASKS, TASKS, Task
from vlrl.data.synth.writer import DEFAULT_MIX, VERSION, make_dataset

__all__ = [
    "DEFAULT_MIX",
    "DIFFICULTIES",
    "FAMILIES",
    "FAMILY_TASKS",
    "TASKS",
    "Task",
    "VERSION",
    "corpus_texts",
    "glossary_texts",
    "make_dataset",
    "select",
    "select_indices",
]

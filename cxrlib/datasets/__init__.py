"""Data sets -> one study table (see :mod:`cxrlib.datasets.table` for the schema).

``build_study_table(dataset, **params) -> (table, skips)`` for ``openi``, ``openi_synth``, ``mimic``
and ``synthetic``; ``save_study_table`` / ``load_study_table`` write and read it.
"""

from cxrlib.datasets.build import DATASETS, build_study_table
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.table import load_study_table, save_study_table, skip_counts, validate_table

__all__ = ["DATASETS", "FINDING_LABELS", "build_study_table", "load_study_table", "save_study_table",
           "skip_counts", "validate_table"]

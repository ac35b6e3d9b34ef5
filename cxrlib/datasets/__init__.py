"""Data sets -> one study table (see :mod:`cxrlib.datasets.table` for the schema).

``build_study_table(dataset, **params) -> (table, skips)`` for every registered data set
(:func:`dataset_names`; each one entry of :mod:`cxrlib.datasets.build`, see
:mod:`cxrlib.datasets.registry`); ``save_study_table`` / ``load_study_table`` write and read it.
"""

from cxrlib.datasets.build import build_study_table
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.registry import (
    DatasetEntry,
    DatasetUnavailable,
    dataset_names,
    get_dataset,
    register_dataset,
    registered_datasets,
)
from cxrlib.datasets.table import load_study_table, save_study_table, skip_counts, validate_table

__all__ = ["DatasetEntry", "DatasetUnavailable", "FINDING_LABELS", "build_study_table", "dataset_names",
           "get_dataset", "load_study_table", "register_dataset", "registered_datasets", "save_study_table",
           "skip_counts", "validate_table"]

"""Training data: JSONL reading and validation, tokenization per format, packing into rows, batching.

Also the package-data folder of the built-in corpus (`corpus.txt`) and demo data.
"""

from memfit.data.batches import Batch, RowOrder, collate, epoch_order, pad_token_id, step_rows
from memfit.data.formats import TokenizedSample, tokenize_record
from memfit.data.jsonl import Record, read_records
from memfit.data.packing import Dataset, DataStats, Row, build_dataset

__all__ = [
    "Batch",
    "DataStats",
    "Dataset",
    "Record",
    "Row",
    "RowOrder",
    "TokenizedSample",
    "build_dataset",
    "collate",
    "pad_token_id",
    "epoch_order",
    "read_records",
    "step_rows",
    "tokenize_record",
]

"""The data layer: raw documents -> byte-level BPE tokenizer -> memory-mapped token shards -> training batches."""

from fermion.data.shards import (
    ShardSet,
    TokenLoader,
    check_tokenizer,
    load_index,
    token_dtype,
    val_batches,
    write_shards,
)
from fermion.data.sources import DataError, interleave_documents, iter_documents
from fermion.data.tokenizer import Tokenizer

__all__ = [
    "DataError",
    "ShardSet",
    "TokenLoader",
    "Tokenizer",
    "check_tokenizer",
    "interleave_documents",
    "iter_documents",
    "load_index",
    "token_dtype",
    "val_batches",
    "write_shards",
]

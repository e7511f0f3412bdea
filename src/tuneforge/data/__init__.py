"""Data stage: read rows, format them, tokenise with loss masks, build datasets."""

from tuneforge.data.build import Datasets, DatasetStats, build_datasets, tokenize_dataset
from tuneforge.data.formats import document_text, format_prompt, instruction_texts
from tuneforge.data.sources import Row, read_file, read_rows, resolve_files
from tuneforge.data.tokenize import (
    IGNORE_INDEX,
    Example,
    build_instruction_example,
    encode_prompt,
    pack_documents,
)

__all__ = [
    "IGNORE_INDEX",
    "DatasetStats",
    "Datasets",
    "Example",
    "Row",
    "build_datasets",
    "build_instruction_example",
    "document_text",
    "encode_prompt",
    "format_prompt",
    "instruction_texts",
    "pack_documents",
    "read_file",
    "read_rows",
    "resolve_files",
    "tokenize_dataset",
]

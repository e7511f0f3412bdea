"""Data stage: read rows, format them, apply templates, tokenise with loss masks, build datasets."""

from tuneforge.data.build import (
    Datasets,
    DatasetStats,
    build_datasets,
    tokenize_dataset,
)
from tuneforge.data.formats import (
    MultipleChoiceItem,
    PreferencePair,
    document_text,
    parse_multiple_choice,
    parse_preference,
    row_to_messages,
)
from tuneforge.data.sources import BadRows, Row, read_file, read_rows, resolve_files
from tuneforge.data.templates import (
    Template,
    encode_conversation,
    encode_generation_prompt,
    encode_prompt_for_generation,
    resolve_template,
)
from tuneforge.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    Example,
    encode_row,
    pack_documents,
)

__all__ = [
    "IGNORE_INDEX",
    "BadRows",
    "DatasetStats",
    "Datasets",
    "Encoded",
    "Example",
    "MultipleChoiceItem",
    "PreferencePair",
    "Row",
    "Template",
    "build_datasets",
    "document_text",
    "encode_conversation",
    "encode_generation_prompt",
    "encode_prompt_for_generation",
    "encode_row",
    "pack_documents",
    "parse_multiple_choice",
    "parse_preference",
    "read_file",
    "read_rows",
    "resolve_files",
    "resolve_template",
    "row_to_messages",
    "tokenize_dataset",
]

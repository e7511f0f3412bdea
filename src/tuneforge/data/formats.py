"""Turn a row into text: (prompt, response) for instruction data, one document for text data."""

from __future__ import annotations

from typing import Any

from tuneforge.config.schema import DatasetSpec
from tuneforge.data.sources import Row
from tuneforge.errors import DataError


def _field_text(row: Row, field: str, spec: DatasetSpec, role: str) -> str:
    if field not in row.fields:
        found = ", ".join(sorted(row.fields)) or "(none)"
        raise DataError(
            f"missing field '{field}' ({role}); the row has: {found}",
            where=row.origin,
            hint=f"set {'response_field' if role == 'response' else role + '_fields'} in the "
            f"dataset config ({spec.name}) to the right field name",
        )
    value: Any = row.fields[field]
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"field '{field}' is a {type(value).__name__}, expected text",
        where=row.origin,
    )


def format_prompt(prompt_text: str, spec: DatasetSpec) -> str:
    """Apply the dataset's prompt template; used for training and for generation alike."""
    return spec.template_text.replace("{prompt}", prompt_text)


def instruction_texts(row: Row, spec: DatasetSpec) -> tuple[str, str]:
    """The formatted prompt and the response of an instruction row."""
    parts = [_field_text(row, field, spec, "prompt") for field in spec.prompt_fields]
    prompt_text = "\n\n".join(part for part in parts if part.strip())
    response = _field_text(row, spec.response_field, spec, "response")
    return format_prompt(prompt_text, spec), response


def document_text(row: Row, spec: DatasetSpec) -> str:
    """A text row's fields joined by newlines (`title` + `content` for news corpora)."""
    parts = [_field_text(row, field, spec, "text") for field in spec.text_fields]
    return "\n".join(part for part in parts if part)


__all__ = ["document_text", "format_prompt", "instruction_texts"]

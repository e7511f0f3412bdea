"""Keep secrets out of everything tuneforge prints or writes (resolved configs, summaries).

A value is treated as secret when its key looks like one (token, api key, password, secret)
or when it looks like a credential itself (Hugging Face `hf_...`, OpenAI-style `sk-...`, or
the value of a secret environment variable such as HF_TOKEN or WANDB_API_KEY).
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
SECRET_KEY = re.compile(r"(token|api[_-]?key|secret|passw(or)?d|credential)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{20,})$")
SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD")
# Keys that mention tokens but hold no secret (tokenizer settings).
NOT_SECRET_KEYS = re.compile(r"(special_tokens|max_new_tokens|token_ids|tokens_seen|tokenizer|pad_token|bos_token|eos_token|new_special_tokens)", re.IGNORECASE)


def _environment_secrets() -> set[str]:
    return {value for name in SECRET_ENVIRONMENT if (value := os.environ.get(name))}


def _is_secret_value(value: str, known: set[str]) -> bool:
    return bool(SECRET_VALUE.match(value)) or value in known or any(secret in value for secret in known)


def redact(data: Any, known: set[str] | None = None) -> Any:
    """A copy of `data` (dicts, lists, scalars) with secret values replaced by `***`."""
    known = _environment_secrets() if known is None else known
    if isinstance(data, dict):
        cleaned = {}
        for key, value in data.items():
            secret_key = SECRET_KEY.search(str(key)) and not NOT_SECRET_KEYS.search(str(key))
            if secret_key and value not in (None, "", False):
                cleaned[key] = REDACTED
            else:
                cleaned[key] = redact(value, known)
        return cleaned
    if isinstance(data, list):
        return [redact(item, known) for item in data]
    if isinstance(data, str) and _is_secret_value(data, known):
        return REDACTED
    return data


__all__ = ["REDACTED", "redact"]

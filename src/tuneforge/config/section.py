"""The base of every config section: unknown keys fail with a suggestion."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

# Keys people bring from other tools or older transformers releases, and where they live here.
RENAMED_KEYS: dict[str, str] = {
    "evaluation_strategy": "train.eval_strategy",
    "output_dir": "output.dir",
    "overwrite_output_dir": "output.overwrite",
    "resume_from_checkpoint": "output.resume",
    "keys_to_finetune": "method.trainable (with method.name: freeze)",
    "keys_to_freeze": "method.frozen (with method.name: freeze)",
    "lora_r": "method.r",
    "use_liger_kernel": "speed.liger",
    "model_name_or_path": "model.path",
    "pretrained_name": "model.path",
}


class Section(BaseModel):
    """A config section: unknown keys are errors that suggest the closest known key."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        known |= {f.alias for f in cls.model_fields.values() if f.alias}
        for key in data:
            if key in known:
                continue
            if key in RENAMED_KEYS:
                raise PydanticCustomError(
                    "renamed_key",
                    "unknown key '{key}': use {new} instead",
                    {"key": key, "new": RENAMED_KEYS[key]},
                )
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            suggestion = f"; did you mean '{close[0]}'?" if close else ""
            listing = f" (known keys: {', '.join(sorted(known))})" if len(known) <= 15 else ""
            raise PydanticCustomError(
                "unknown_key",
                "unknown key '{key}'{suggestion}{listing}",
                {"key": key, "suggestion": suggestion, "listing": listing},
            )
        return data

"""Errors a user can act on.

Every user-facing failure is a ``TuneforgeError``: it names where the problem is (file and
line, or the config key), what was expected and what was found, and gives a hint. The CLI
prints these without a traceback.
"""

from __future__ import annotations


class TuneforgeError(Exception):
    """Base class for errors caused by user input (config, data, model choice)."""

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(TuneforgeError):
    """The YAML config, an override, or a component reference is invalid."""


class DataError(TuneforgeError):
    """A data file or row cannot be used."""


class ModelError(TuneforgeError):
    """A model or tokenizer cannot be loaded as configured."""


class MethodError(TuneforgeError):
    """The fine-tuning method cannot be applied to the model as configured."""

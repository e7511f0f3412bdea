"""`_target_` components: user callables named by dotted path (Hydra/torchtune style).

Only this module imports user code. The main code never imports a component's module
itself, so a custom dataset or model builder needs no change to tuneforge.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from tuneforge.config.schema import Component
from tuneforge.errors import ConfigError


def resolve_target(component: Component, key: str) -> Callable[..., Any]:
    """Import the callable a component names.

    Args:
        component: the parsed `_target_` block.
        key: the config key holding it, for error messages (e.g. `model.builder`).

    Raises:
        ConfigError: the module or attribute does not exist, or is not callable.
    """
    # Like `python -m`, user modules next to where the command runs are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    dotted = component.target
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"'{dotted}' is not a dotted path",
            where=f"{key}._target_",
            hint="write module.function or package.module.Class, e.g. my_data.load_rows",
        )
    error: Exception | None = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing *requested* module means "try a shorter prefix";
            # a missing import inside the user's module is their bug to see.
            if exc.name is None or not module_name.startswith(exc.name):
                raise ConfigError(
                    f"importing '{module_name}' failed: {exc}", where=f"{key}._target_"
                ) from exc
            error = exc
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise ConfigError(
                    f"module '{module_name}' has no attribute '{attr}' (from '{dotted}')",
                    where=f"{key}._target_",
                    hint="check the spelling of the function or class name",
                )
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ConfigError(f"'{dotted}' is not callable", where=f"{key}._target_")
        return obj
    raise ConfigError(
        f"cannot import '{dotted}': {error}",
        where=f"{key}._target_",
        hint="the module must be importable: install it, or run tuneforge from the folder "
        "that contains it (the current directory is on the import path)",
    )


def instantiate(component: Component, key: str, **runtime: Any) -> Any:
    """Call a component with its keyword arguments (and runtime objects such as a tokenizer)."""
    func = resolve_target(component, key)
    try:
        inspect.signature(func).bind(**component.kwargs, **runtime)
    except TypeError as exc:
        raise ConfigError(
            f"'{component.target}' does not accept these arguments: {exc}",
            where=key,
            hint="the keys next to _target_ are passed as keyword arguments",
        ) from exc
    except ValueError:  # builtins without a signature: let the call itself complain
        pass
    return func(**component.kwargs, **runtime)


__all__ = ["instantiate", "resolve_target"]

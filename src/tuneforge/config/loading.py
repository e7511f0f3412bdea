"""Load a config: YAML (with `extends`) + command-line overrides -> validated `Config`.

Every error names the file and line (or the override) and the key:

    examples/quickstart.yaml:14 (train.learnig_rate): unknown key 'learnig_rate'; did you mean 'learning_rate'?
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tuneforge.config.optimizers import check_optimizer
from tuneforge.config.schema import Component, Config
from tuneforge.config.secrets import redact
from tuneforge.config.targets import resolve_target
from tuneforge.errors import ConfigError

Locations = dict[tuple[Any, ...], str]


def _read_yaml(path: Path) -> tuple[dict[str, Any], Locations]:
    if not path.is_file():
        raise ConfigError(
            "config file not found",
            where=str(path),
            hint=f"paths are relative to the current directory ({Path.cwd()})",
        )
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where) from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of sections (model, data, ...), found {type(data).__name__}",
            where=str(path),
        )
    locations: Locations = {}
    _record_locations(node, (), path, locations)
    return data, locations


def _record_locations(node: yaml.Node, prefix: tuple[Any, ...], path: Path, out: Locations) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise ConfigError(
                    f"duplicate key '{key}'",
                    where=f"{path}:{key_node.start_mark.line + 1}",
                    hint="YAML keeps only the last value; remove one",
                )
            seen.add(key)
            out[prefix + (key,)] = f"{path}:{key_node.start_mark.line + 1}"
            _record_locations(value_node, prefix + (key,), path, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[prefix + (index,)] = f"{path}:{item.start_mark.line + 1}"
            _record_locations(item, prefix + (index,), path, out)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Child keys win; nested mappings merge; lists are replaced whole."""
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Locations]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise ConfigError(f"'extends' forms a cycle: {cycle}", where=str(path))
    data, locations = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data, locations
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(
            "'extends' must be a file path or a list of paths",
            where=locations.get(("extends",), str(path)),
        )
    merged: dict[str, Any] = {}
    merged_locations: Locations = {}
    for parent in parents:
        parent_data, parent_locations = _load_with_extends(path.parent / parent, chain + (resolved,))
        merged = _merge(merged, parent_data)
        merged_locations.update(parent_locations)
    merged_locations.update(locations)
    return _merge(merged, data), merged_locations


def parse_override(text: str) -> tuple[tuple[Any, ...], Any]:
    """`train.learning_rate=1e-4` -> (('train', 'learning_rate'), 0.0001).

    The value is read as YAML, so `true`, `3`, `[a, b]` and `{r: 8}` have their YAML types.
    Numeric path parts index lists: `data.datasets.0.path=x.jsonl`.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override '{text}' is not of the form section.key=value",
            where="command line",
            hint="for example: train.learning_rate=1e-4 method.name=lora",
        )
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads 1e-4 as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    path = tuple(int(part) if part.isdigit() else part for part in key.split("."))
    return path, value


def apply_override(data: dict[str, Any], path: tuple[Any, ...], value: Any, text: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(
                    f"'{'.'.join(map(str, path[: depth + 1]))}' is not an existing list item",
                    where=f"command line override '{text}'",
                )
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise ConfigError(
                f"'{'.'.join(map(str, path[:depth]))}' is not a section",
                where=f"command line override '{text}'",
            )
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError("not an existing list item", where=f"command line override '{text}'")
    elif not isinstance(node, dict):
        raise ConfigError("the parent key is not a section", where=f"command line override '{text}'")
    node[last] = value


def _walk_data_path(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Map a pydantic error location onto the user's keys (drops union tags like 'lora')."""
    path: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and node.get("name") == part:
            continue  # discriminated-union tag: not a key the user wrote
        else:
            path.append(part)
            node = None
    return tuple(path)


def _describe_error(error: dict[str, Any], data: dict[str, Any], locations: Locations) -> str:
    path = _walk_data_path(data, tuple(error["loc"]))
    kind = error["type"]
    if kind in ("unknown_key", "renamed_key"):
        path = path + (error["ctx"]["key"],)
    dotted = ".".join(str(p) for p in path) or "(top level)"
    where = None
    for end in range(len(path), -1, -1):
        where = locations.get(path[:end])
        if where:
            break
    message = error["msg"]
    if kind.startswith("value_error"):
        message = message.removeprefix("Value error, ")
    if kind == "missing":
        message = "required key is missing"
    elif kind not in ("unknown_key", "renamed_key") and "input" in error and not kind.startswith(
        "value_error"
    ):
        found = error["input"]
        if not isinstance(found, (dict, list)):
            message += f"; found {found!r} ({type(found).__name__})"
    return f"{where or 'config'} ({dotted}): {message}"


def _check_targets(config: Config) -> None:
    """Fail at load time, not after the model is loaded, when a `_target_` cannot be imported."""
    if config.model.builder is not None:
        resolve_target(config.model.builder, "model.builder")
    for group in ("datasets", "eval_datasets"):
        for index, spec in enumerate(getattr(config.data, group)):
            if isinstance(spec.source, Component):
                resolve_target(spec.source, f"data.{group}.{index}.source")


def load_config(
    source: str | Path | dict[str, Any] | Config,
    overrides: list[str] | None = None,
) -> Config:
    """Read, merge, override and validate a config.

    Args:
        source: a YAML path, a dict with the same shape, or an existing `Config`.
        overrides: `section.key=value` strings applied after the file is read.

    Raises:
        ConfigError: naming the file, line and key of every problem found.
    """
    if isinstance(source, Config):
        if not overrides:
            return source
        source = source.model_dump(by_alias=True, exclude_unset=True)
    if isinstance(source, dict):
        data, locations, stem = copy.deepcopy(source), {}, "run"
    else:
        path = Path(source)
        data, locations = _load_with_extends(path)
        stem = path.stem
    for text in overrides or []:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value, text)
        locations[key_path] = f"command line override '{text}'"
    if data.get("output") is None:  # absent, or `output:` with nothing under it
        data["output"] = {}
    if isinstance(data["output"], dict) and data["output"].get("dir") is None:  # absent, or null: the default
        data["output"]["dir"] = f"runs/{stem}"
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(err, data, locations) for err in exc.errors()]
        summary = "invalid config" if len(lines) == 1 else f"{len(lines)} problems in the config"
        raise ConfigError(
            f"{summary}:\n  " + "\n  ".join(lines),
            hint="docs/configuration.md lists every key with its type and default",
        ) from None
    _check_targets(config)
    check_optimizer(config)
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML: every section in full, `train` as set plus tuneforge's defaults.

    Secrets (hub tokens, API keys) are replaced by `***`: this text is printed and saved.
    """
    from tuneforge.config.training_args import TUNEFORGE_DEFAULTS

    data = config.model_dump(mode="json", by_alias=True, exclude={"train"})
    train = dict(TUNEFORGE_DEFAULTS)
    train.update(config.train.model_dump(mode="json", exclude_unset=True))
    # Pipeline order first, then every other section, so a new section is never left out.
    ordered = {"model": data.pop("model"), "data": data.pop("data"), "method": data.pop("method"), "train": train}
    ordered.update(data)
    return yaml.safe_dump(redact(ordered), sort_keys=False, allow_unicode=True)


__all__ = ["apply_override", "dump_config", "load_config", "parse_override"]

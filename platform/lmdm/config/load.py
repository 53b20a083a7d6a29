"""Loading configs from YAML with ``a.b=value`` overrides, validated in one place.

Every failure is a :class:`ConfigError` whose message names the file (or the override), the dotted
key, the bad value and what is allowed, so a user can fix it without reading the schema code.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmdm.config.schema import Config, default_config_dir

__all__ = ["ConfigError", "dump_config", "load_config", "parse_override", "resolve_config_path"]


class ConfigError(ValueError):
    """A config file, key, type or value is wrong. The message says where and what is allowed."""


def resolve_config_path(config: str | Path) -> Path:
    """Find a config by path, or by name among the shipped configs (``quickstart`` → quickstart.yaml).

    Raises:
        ConfigError: when neither a file at that path nor a shipped config of that name exists.
    """
    path = Path(config)
    if path.is_file():
        return path
    shipped = default_config_dir()
    for candidate in (shipped / f"{config}.yaml", shipped / str(config)):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in shipped.glob("*.yaml"))
    raise ConfigError(f"config {str(config)!r}: no such file, and no shipped config of that name (shipped: {', '.join(names)})")


def _refuse_aliases(text: str, where: str) -> None:
    """Configs may not use YAML aliases (``*name``): nested aliases expand exponentially (a "billion laughs"
    file of a few lines becomes gigabytes once validated), so they are refused before anything is expanded.
    Scanning the event stream is linear in the text.

    Raises:
        ConfigError: at the first alias, naming its line and column.
    """
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise ConfigError(
                    f"{where}: YAML alias '*{event.anchor}'{at}: "
                    "aliases are not allowed in configs (nested aliases expand exponentially); write the values out"
                )
    except yaml.YAMLError:
        return  # the loader reports syntax errors with their position


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-typed value (``3`` → int, ``[1, 2]`` → list).

    Raises:
        ConfigError: when the text has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=100")
    _refuse_aliases(raw, f"override {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    _refuse_aliases(text, str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _model_at(path: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``path`` (for listing allowed keys)."""
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _apply_override(data: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    node: dict[str, Any] = data
    for depth, part in enumerate(keys[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            prefix = ".".join(keys[: depth + 1])
            raise ConfigError(f"override {text!r}: {prefix} is a value, not a section; cannot set {'.'.join(keys)}")
        node = child
    node[keys[-1]] = value


def _allowed(loc: Sequence[str | int], error_type: str) -> str:
    if error_type == "extra_forbidden":
        owner = _model_at(loc[:-1])
        if owner is not None:
            key = str(loc[-1])
            keys = sorted(owner.model_fields)
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"unknown key{hint}; allowed keys here: {', '.join(keys)}"
    return ""


def _format_errors(exc: ValidationError, source_of: dict[str, str], default_source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [part for part in err["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
        dotted = ".".join(str(part) for part in loc) or "(top level)"
        source = default_source
        for i in range(len(loc), 0, -1):
            prefix = ".".join(str(p) for p in loc[:i])
            if prefix in source_of:
                source = source_of[prefix]
                break
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f": got {value!r}"
        allowed = _allowed(loc, err["type"]) or err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {dotted}{shown}: {allowed}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(config: str | Path = "quickstart", overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None) -> Config:
    """Load, override and validate a config.

    Args:
        config: a YAML file path, or the name of a shipped config (``quickstart``).
        overrides: ``a.b=value`` strings applied in order on top of the file; values are YAML.
        base: an already-loaded mapping to use instead of reading ``config`` (tests, round trips).

    Returns:
        The validated :class:`Config`. ``name`` defaults to the file's stem.

    Raises:
        ConfigError: naming the file or override, the dotted key, the bad value and what is allowed.
    """
    if base is not None:
        source = "<mapping>"
        data: dict[str, Any] = _deep_copy(dict(base))
    else:
        path = resolve_config_path(config)
        source = str(path)
        data = _read_yaml(path)
        data.setdefault("name", path.stem)
    source_of: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, text)
        source_of[".".join(keys)] = f"override {text!r}"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source_of, source)) from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def dump_config(config: Config) -> str:
    """The config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

"""Loading a job config: YAML or dicts, ``--set`` overrides, readable errors, hashes."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raypipe.config.models import JobConfig
from raypipe.errors import ConfigError


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    cur: Any = model
    for part in loc[:-1]:
        field = cur.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cur = ann
        else:
            return []
    return sorted(cur.model_fields)


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(JobConfig, e["loc"])
            lines.append(f"unknown key {loc!r}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"missing key {loc!r}")
        elif e["loc"] and e["loc"][-1] == "[key]":  # a mapping key, e.g. a scorer name
            where = ".".join(str(p) for p in e["loc"][:-2])
            lines.append(f"{where}: unknown name {e.get('input')!r}; {e['msg']}")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            got = "" if "(got " in msg else f" (got {e.get('input')!r})"
            lines.append(f"{loc}: {msg}{got}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a config dict.

    Parameters
    ----------
    data
        The config as loaded from YAML (changed in place and returned).
    overrides
        Strings like ``"shards.rows=2048"`` or ``"embed.methods=[genept_w,ce]"``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r} is not key=value", fix="write e.g. --set shards.rows=2048"
            )
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        cur = data
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            cur = nxt
        try:
            cur[parts[-1]] = _parse_value(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: the value {value!r} is not valid YAML ({problem})",
                fix="close brackets and quotes, e.g. --set 'embed.methods=[genept_w,genept_s]'",
            ) from None
    return data


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> JobConfig:
    """Load and validate a job config.

    Parameters
    ----------
    source
        Path of a YAML file, or an already-parsed dict.
    overrides
        ``key.sub=value`` strings applied before validation.

    Raises
    ------
    ConfigError
        With one line per problem, unknown keys listing the valid ones.
    """
    if isinstance(source, dict):
        data, name = copy.deepcopy(source), "(dict)"  # overrides never change the caller's dict
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found",
                fix="pass the path of a YAML config, e.g. configs/demo.yaml",
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        name = str(path)
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            _format(exc, name),
            fix="every key is in `raypipe config reference` (docs/reference/configuration.md)",
        ) from None


def config_hash(obj: BaseModel | dict[str, Any]) -> str:
    """Return a short stable hash of a config (or a section of it)."""
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

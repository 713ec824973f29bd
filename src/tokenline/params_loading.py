"""Reading params.yaml: a profile merged over the defaults, `--set key=value` overrides, validation.

The schema lives in `config.py`; this module only turns a file and a command line into `Params`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tokenline.config import ConfigError, Params, check_dataset_name, unknown_dataset_message


def project_root() -> Path:
    """The folder holding params.yaml: the working directory or one of its parents."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").exists():
            return folder
    return here


def _deep_merge(base: dict, patch: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    # YAML gives numbers, booleans, null and lists their types. A value with a colon that is
    # not a list stays a string (`imagefolder:/x` is a source, not a time), and so does one
    # YAML would read as a mapping (`{caption}` is a template).
    if ":" in raw and not raw.lstrip().startswith("["):
        return key.strip().split("."), raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict):
        value = raw
    return key.strip().split("."), value


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        # A section's own check says "lr must be ...": name the key in full (tokenizer.train.lr).
        field_name, _, rest = message.removeprefix("Value error, ").partition(" ")
        if item["type"] == "value_error" and item["loc"] and rest.startswith("must ") and field_name.isidentifier():
            key, message = f"{key}.{field_name}", rest
        lines.append(f"{key}: {message}")
    return "invalid params: " + "; ".join(lines)


def load_params(
    path: Path | str | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
    dataset: str | None = None,
) -> Params:
    """Load params.yaml, apply a profile and `key=value` overrides, and validate.

    With `dataset`, that dataset becomes the only active one; a name params do not define
    is created from the overrides (`datasets.NAME.source=...`).
    """
    path = Path(path) if path else project_root() / "params.yaml"
    if not path.exists():
        raise ConfigError(f"params file {path} does not exist")
    document = yaml.safe_load(path.read_text()) or {}
    profiles = document.pop("profiles", {}) or {}
    chosen = profile or document.get("profile") or "cpu"
    if chosen not in profiles:
        raise ConfigError(f"profile {chosen!r} is not defined in {path} (known: {', '.join(profiles)})")
    tree = _deep_merge(document, profiles[chosen] or {})
    tree["profile"] = chosen
    for text in overrides or []:
        key_path, value = _parse_override(text)
        _apply_override(tree, key_path, value)
    if dataset:
        check_dataset_name(dataset)
        if dataset not in (tree.get("datasets") or {}):
            raise ConfigError(unknown_dataset_message(dataset, tree.get("datasets") or {}))
        tree["active_datasets"] = [dataset]
    try:
        params = Params.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None
    return params

"""Load and validate a workflow config against `workflow/schemas/config.schema.yaml`.

Defaults from the schema are filled in; the first violation raises `ConfigError` naming the key
(dotted path) and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


def _with_defaults(validator_class):
    """A validator that fills `default` values of missing properties before checking them."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        parent = f" in '{key}'" if error.absolute_path else ""
        return f"unknown key(s) {unknown}{parent}; allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"'{key}' = {error.instance!r} is not allowed; allowed values: {error.validator_value}"
    if error.validator == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"'{key}' = {error.instance!r} has the wrong type: expected {' or '.join(expected)}"
    if error.validator == "required":
        return f"missing key{' in ' + repr(key) if error.absolute_path else ''}: {error.message}"
    return f"'{key}': {error.message}"


def validate(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Fill defaults into `config` in place and check it; returns it. Raises ConfigError."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config: " + _describe(errors[0]))
    return config


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    try:
        return validate(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_hash(config: dict) -> str:
    """Short sha256 of the validated config (canonical JSON), recorded in every result."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

"""Recipes: YAML files of `surgery prune` settings. The schema is the command's own options.

Each key is a `surgery prune` option name (`strategy`, `heal_steps`, `lora_r`, ...; dashes or
underscores) or `model`; values are checked and converted by the same click types as on the
command line, so a recipe can hold exactly what the command accepts. Options given on the
command line override the recipe.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import click
import yaml

from surgery.errors import SurgeryError


def read_recipe(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"recipe {path} not found (the shipped ones are in recipes/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SurgeryError(f"recipe {path}{where} is not valid YAML: fix the syntax") from None
    if not isinstance(data, dict):
        raise SurgeryError(f"recipe {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items() if k != "description"}


def apply_recipe(ctx: click.Context, path: Path) -> dict[str, Any]:
    """Recipe values for the options the user did not give on the command line, validated."""
    recipe = read_recipe(path)
    params = {p.name: p for p in ctx.command.params if p.name not in ("recipe",)}
    values: dict[str, Any] = {}
    for key, raw in recipe.items():
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SurgeryError(f"recipe {path}: unknown key '{key}'{hint}; keys are surgery prune's options")
        param = params[key]
        if raw is None:
            raise SurgeryError(f"recipe {path}: '{key}' has no value: give one or delete the line")
        if isinstance(param.type, click.types.IntParamType) and (isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer()):
            raise SurgeryError(f"recipe {path}: {key}: {raw!r} is not a whole number")
        if isinstance(raw, list):
            raw = ",".join(str(v) for v in raw)
        try:
            value = param.type_cast_value(ctx, raw)
        except click.BadParameter as error:
            raise SurgeryError(f"recipe {path}: {key}: {error.format_message()}") from None
        source = ctx.get_parameter_source(key)
        if source in (click.core.ParameterSource.DEFAULT, None):
            values[key] = value
    return values

"""The JSON schema of the YAML form (what `nlc schema` prints): the Spec's schema plus the two
pieces of sugar resolved before validation, `templates:` and a level's `use:`."""
from __future__ import annotations

from typing import Union

from pydantic import TypeAdapter

from nlc import spec as S


def json_schema() -> dict:
    schema = TypeAdapter(Union[S.ModelSpec, S.OptimizerSpec]).json_schema()
    defs = schema.get("$defs", {})
    if "Level" in defs:
        defs["Level"]["properties"]["use"] = {"type": "string", "description": "a template (from `templates:`) whose settings this level takes; its own keys win"}
        defs["Level"]["required"] = [r for r in defs["Level"].get("required", []) if r != "memory"]
    if "ModelSpec" in defs:
        defs["ModelSpec"]["properties"]["templates"] = {
            "type": "object", "additionalProperties": {"$ref": "#/$defs/Level"},
            "description": "named level settings shared by several levels (`use: NAME`)"}
    schema["title"] = "nlc spec (YAML form)"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema

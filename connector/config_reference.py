"""docs/configuration.md, generated from the configuration models in connector/config.py:

    python -m connector.config_reference > docs/configuration.md

One table per section of the file, one row per field, by its full path (`kafka.topics.changes`). The
models are the only source: a field's description is its docstring (`use_attribute_docstrings`), its
environment variable the `env` of its `json_schema_extra`, its type, bounds and default what pydantic
knows; a `SecretStr` field is marked secret. tests/unit/test_config_reference.py fails when the file
differs from `render()`.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from connector.config import ConnectorConfig

DOC_PATH = "docs/configuration.md"
COMMAND = f"python -m connector.config_reference > {DOC_PATH}"

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", SecretStr: "string",
                            Any: "any"}
_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", "≥"), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "≤"))


@dataclass(frozen=True)
class Row:
    path: str
    type: str
    default: str
    env: str | None
    secret: bool
    description: str


@dataclass(frozen=True)
class Section:
    path: str  # "" for the top level of the file
    model: type[BaseModel]
    rows: tuple[Row, ...]


def _without_none(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The section's model when the field is a section (`kafka`, `source.config`, ...), else None."""
    models = [a for a in _without_none(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else None


def _type_name(annotation: Any) -> str:
    parts = _without_none(annotation)
    if len(parts) > 1:
        return " or ".join(_type_name(p) for p in parts)
    (annotation,) = parts
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin is dict:
        key, value = typing.get_args(annotation)
        return "mapping" if value is Any else f"mapping of {_type_name(key)} to {_type_name(value)}"
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    raise TypeError(f"no name for the type {annotation!r}: add it to connector/config_reference.py")


def _bounds(field: FieldInfo) -> str:
    found = [f"{sign} {_value(getattr(m, attr))}" for m in field.metadata for cls, attr, sign in _BOUNDS
             if isinstance(m, cls)]
    return ", ".join(found)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value) if isinstance(value, (dict, list)) or value == "" else str(value)


def _anchor(path: str) -> str:
    return path.replace(".", "").lower()  # as GitHub makes a heading's anchor


def _default(path: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "its fields' defaults"
    return f"`{_value(value)}`"


def _description(field: FieldInfo) -> str:
    text = " ".join((field.description or "").split())
    return text.replace("|", "\\|")


def _env(field: FieldInfo) -> str | None:
    extra = field.json_schema_extra
    name = extra.get("env") if isinstance(extra, dict) else None
    return name if isinstance(name, str) else None


def _row(path: str, field: FieldInfo) -> Row:
    annotation = field.annotation
    secret = SecretStr in _without_none(annotation)
    name = _type_name(annotation)
    if nested_model(annotation) is not None:
        name = f"[section](#{_anchor(path)})"
    bounds = _bounds(field)
    if bounds:
        name = f"{name}, {bounds}"
    return Row(path, name, _default(path, field), _env(field), secret, _description(field))


def sections(model: type[BaseModel] = ConnectorConfig, path: str = "") -> list[Section]:
    """The model's section and, after it, each of its nested sections, in the order of the fields."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        field_path = f"{path}.{name}" if path else name
        rows.append(_row(field_path, field))
        sub = nested_model(field.annotation)
        if sub is not None:
            nested += sections(sub, field_path)
    return [Section(path, model, tuple(rows)), *nested]


def environment_variables(found: list[Section]) -> dict[str, list[str]]:
    """Each environment variable, with the fields it stands in for."""
    names: dict[str, list[str]] = {}
    for section in found:
        for row in section.rows:
            if row.env:
                names.setdefault(row.env, []).append(row.path)
    return names


HEADER = f"""\
# Configuration reference

<!-- Generated from connector/config.py: do not edit by hand. -->
Generated from the configuration models in `connector/config.py` by `{COMMAND}`
(from the repository root): to change this page, change the models (a field's description is its docstring,
its environment variable the `env` of its `json_schema_extra`) and run that command again.
`tests/unit/test_config_reference.py` fails when this file is out of date.

The configuration is one YAML file, a DataHub recipe with sections of its own: the `source` block of an
existing MLflow recipe is accepted as it is (see [compatibility.md](compatibility.md#1-recipe)), and a
`datahub-kafka` `sink` block is read for the Kafka connection. Unknown fields and values of the wrong type
stop start-up with one line naming the field. A field marked **secret** is never shown: its value is
masked in every line the connector writes. A field with an environment variable takes the variable's
value when the file leaves the field out.
"""


def _section_title(section: Section) -> str:
    return f"`{section.path}`" if section.path else "Top level"


def render() -> str:
    """The Markdown of docs/configuration.md."""
    found = sections()
    out = [HEADER, "Sections: " + " · ".join(
        f"[{_section_title(s)}](#{_anchor(s.path) if s.path else 'top-level'})" for s in found) + "\n"]
    for section in found:
        out.append(f"## {section.path or 'Top level'}\n")
        intro = " ".join((section.model.__dict__.get("__doc__") or "").split())
        if intro:
            out.append(intro + "\n")
        out.append("| field | type | default | environment variable | description |")
        out.append("|---|---|---|---|---|")
        for row in section.rows:
            kind = f"{row.type}, **secret**" if row.secret else row.type
            env = f"`{row.env}`" if row.env else ""
            out.append(f"| `{row.path}` | {kind} | {row.default} | {env} | {row.description} |")
        out.append("")
    out.append("## Environment variables\n")
    out.append("| variable | stands in for |")
    out.append("|---|---|")
    for name, paths in environment_variables(found).items():
        out.append(f"| `{name}` | {', '.join(f'`{p}`' for p in paths)} |")
    out.append("")
    return "\n".join(out)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()

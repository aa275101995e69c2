"""Reading a project's ``faas.yaml`` into a ``Manifest``.

The manifest is the user-facing spelling of ``VersionConfig`` (``memory`` in MB for ``memory_mb``,
``timeout`` in seconds for ``timeout_s``) plus the function's ``name`` and the ``include``/``exclude``
globs the archive builder applies.  Validation is ``VersionConfig``'s own (so the CLI and the gateway
reject the same values); this module only turns each failure into one line that names the file, the
field as the user wrote it, why, and what was given::

    faas.yaml: field 'memory': must be >= 64 (got 10)

Every problem found is reported at once (one line each) in a ``ManifestError``.  Environment values
may be written as YAML numbers or booleans (``DEBUG: true``): they are turned into the strings the
function will see (``"true"``), since an environment only holds strings.  A key given with no value
(``environment:``) means "empty" for ``environment``, ``description``, ``include`` and ``exclude``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from faas.core.errors import InvalidRequest
from faas.core.models import VersionConfig, name_problem

MANIFEST_FILE = "faas.yaml"

# Manifest key -> VersionConfig field.
CONFIG_FIELDS: dict[str, str] = {
    "runtime": "runtime",
    "handler": "handler",
    "memory": "memory_mb",
    "timeout": "timeout_s",
    "concurrency": "concurrency",
    "min_instances": "min_instances",
    "max_instances": "max_instances",
    "environment": "environment",
    "description": "description",
    "max_retries": "max_retries",
    "max_event_age": "max_event_age_s",
}
MANIFEST_KEYS = ("name", *CONFIG_FIELDS, "include", "exclude")
_KEY_OF_FIELD = {field: key for key, field in CONFIG_FIELDS.items()}
_NUMERIC_KEYS = ("memory", "timeout", "concurrency", "min_instances", "max_instances", "max_retries", "max_event_age")
_EMPTY_WHEN_NULL: dict[str, Any] = {"environment": {}, "description": "", "include": [], "exclude": []}


class ManifestError(InvalidRequest):
    """``faas.yaml`` is missing, unreadable or invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems), error_type="ManifestError")
        self.problems = problems


@dataclass(frozen=True)
class Manifest:
    name: str
    config: VersionConfig
    path: Path  # the faas.yaml file
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def project_dir(self) -> Path:
        return self.path.parent


def manifest_path(path: str | Path) -> Path:
    """The manifest file for ``path``, which is either a project folder or the file itself."""
    path = Path(path)
    return path / MANIFEST_FILE if path.is_dir() else path


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path`` (a project folder or its ``faas.yaml``)."""
    file = manifest_path(path)
    where = str(file)
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(
            [f"{where}: not found (create a project with 'faas init NAME', or pass its folder)"]
        ) from None
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise ManifestError([f"{where}: cannot be read: {exc.strerror or exc}"]) from None
    return parse_manifest(text, file)


def parse_manifest(text: str, file: Path) -> Manifest:
    """Validate manifest ``text``; ``file`` names it in messages and anchors the project folder."""
    where = str(file)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        raise ManifestError([f"{where}: not valid YAML{_yaml_location(exc)}: {_yaml_reason(exc)}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([f"{where}: not valid YAML: {exc}"]) from None
    if data is None:
        raise ManifestError([f"{where}: the top level must be a mapping (the file is empty)"])
    if not isinstance(data, dict):
        raise ManifestError([f"{where}: the top level must be a mapping (got {_kind(data)})"])

    problems: list[str] = []
    for key in data:
        if key not in MANIFEST_KEYS:
            hint = difflib.get_close_matches(str(key), MANIFEST_KEYS, n=1)
            suffix = (
                f" (did you mean '{hint[0]}'?)" if hint else f" (known fields: {', '.join(MANIFEST_KEYS)})"
            )
            problems.append(f"{where}: unknown field '{key}'{suffix}")

    name = data.get("name")
    if "name" not in data or name is None:
        problems.append(f"{where}: missing required field 'name'")
    elif not isinstance(name, str):
        problems.append(f"{where}: field 'name': must be a string (got {_show(name)})")
    elif reason := name_problem(name):
        problems.append(f"{where}: field 'name': {reason}")

    values: dict[str, Any] = {}
    for key, field in CONFIG_FIELDS.items():
        if key not in data:
            continue
        value = data[key]
        if value is None and key in _EMPTY_WHEN_NULL:
            value = _EMPTY_WHEN_NULL[key]
        if key in _NUMERIC_KEYS and isinstance(value, bool):
            problems.append(f"{where}: field '{key}': must be a number (got {_show(value)})")
            continue
        if key == "environment" and isinstance(value, dict):
            value, env_problems = _environment_strings(value)
            problems.extend(f"{where}: field 'environment': {p}" for p in env_problems)
        values[field] = value

    globs: dict[str, tuple[str, ...]] = {}
    for key in ("include", "exclude"):
        value = data.get(key)
        if value is None:
            value = []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            problems.append(f"{where}: field '{key}': must be a list of glob patterns (got {_show(value)})")
            continue
        globs[key] = tuple(value)

    config: VersionConfig | None = None
    try:
        config = VersionConfig(**values)
    except ValidationError as exc:
        problems.extend(f"{where}: {line}" for line in _validation_lines(exc))
    except ValueError as exc:  # a check outside pydantic's validators
        problems.append(f"{where}: {exc}")

    if problems or config is None or not isinstance(name, str):
        raise ManifestError(problems or [f"{where}: invalid manifest"])
    return Manifest(
        name=name,
        config=config,
        path=file,
        include=globs.get("include", ()),
        exclude=globs.get("exclude", ()),
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: let the base class report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_location(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    return f" (line {mark.line + 1})" if mark is not None else ""


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    context = exc.context
    if context and exc.context_mark is not None and exc.problem_mark is not None:
        if exc.context_mark.line != exc.problem_mark.line:
            context = f"{context} (from line {exc.context_mark.line + 1})"
    parts = [part for part in (context, exc.problem) if part]
    return ", ".join(parts) if parts else "cannot be parsed"


def _environment_strings(env: dict[Any, Any]) -> tuple[dict[Any, Any], list[str]]:
    out: dict[Any, Any] = {}
    problems: list[str] = []
    for key, value in env.items():
        if not isinstance(key, str):
            problems.append(f"variable names must be strings (got {_show(key)})")
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, int | float):
            out[key] = str(value)
        elif value is None:
            out[key] = ""
        elif isinstance(value, str):
            out[key] = value
        else:
            problems.append(f"the value of {key!r} must be a string, number or boolean (got {_kind(value)})")
    return out, problems


def _validation_lines(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc") or ()
        if loc:
            key = _KEY_OF_FIELD.get(str(loc[0]), str(loc[0]))
            label = ".".join([key, *(str(part) for part in loc[1:])])
            lines.append(f"field '{label}': {_reason(error)}")
        elif "min_instances" in str(error.get("msg", "")) and isinstance(error.get("input"), dict):
            given = error["input"]
            low, high = (
                given.get(field, VersionConfig.model_fields[field].default)
                for field in ("min_instances", "max_instances")
            )
            lines.append(f"field 'min_instances': must not exceed max_instances (got {low} > {high})")
        else:
            lines.append(_reason(error))
    return lines


def _reason(error: Any) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    got = f" (got {_show(error.get('input'))})"
    if kind == "greater_than_equal":
        return f"must be >= {_num(ctx.get('ge'))}{got}"
    if kind == "less_than_equal":
        return f"must be <= {_num(ctx.get('le'))}{got}"
    if kind == "greater_than":
        return f"must be > {_num(ctx.get('gt'))}{got}"
    if kind == "less_than":
        return f"must be < {_num(ctx.get('lt'))}{got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number{got}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number{got}"
    if kind in ("string_type",):
        return f"must be a string{got}"
    if kind in ("dict_type",):
        return f"must be a mapping{got}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the allowed values')}{got}"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return _kind(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    return f"{_show(value)}"

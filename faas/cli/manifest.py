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
(``environment:``) means "empty" for ``environment``, ``description``, ``include``, ``exclude`` and
``events``.

``on_success`` / ``on_failure`` take ``{function: NAME[:QUALIFIER]}`` or ``{stream: NAME}``, or the
shorthand strings ``function:NAME[:QUALIFIER]`` / ``stream:NAME``.

``events`` is a list of event subscriptions, each ``{name?, object_store|queue|timer|cloudevents: {...},
qualifier?, enabled?}``, validated by the platform's own ``SubscriptionSpec`` and reported by path
(``field 'events[1].queue.batch_size': must be <= 1000 (got 5000)``; indexes count from 0).  Friendly
forms: ``timer: rate(5 minutes)`` for ``timer: {schedule: ...}``; ``cloudevents:`` with no value for
"every event"; ``events: ObjectCreated:*`` for a one-item list; ``batch_window: 2s`` (also ``2``,
``500ms``, ``1m``) for ``batch_window_s``.  An item without a name is called ``<kind>-<n>``, with ``n``
counting the items of that kind from 1 (``object-store-1``, ``timer-2``).  ``Manifest.events`` is None
when the key is absent, which tells ``faas deploy`` to leave the function's subscriptions alone.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from faas.core.errors import InvalidRequest
from faas.core.models import VersionConfig, name_problem
from faas.core.subscriptions import (
    SOURCE_KINDS,
    CloudEventsSource,
    NamedSubscriptionSpec,
    ObjectStoreSource,
    QueueSource,
    SubscriptionSpec,
    TimerSource,
)

MANIFEST_FILE = "faas.yaml"

# Manifest key -> VersionConfig field.
CONFIG_FIELDS: dict[str, str] = {
    "kind": "kind",
    "runtime": "runtime",
    "handler": "handler",
    "entry": "handler",  # an app's 'module:app' (kind: app)
    "readiness_path": "readiness_path",
    "memory": "memory_mb",
    "timeout": "timeout_s",
    "concurrency": "concurrency",
    "min_instances": "min_instances",
    "max_instances": "max_instances",
    "environment": "environment",
    "description": "description",
    "max_retries": "max_retries",
    "max_event_age": "max_event_age_s",
    "on_success": "on_success",
    "on_failure": "on_failure",
    "public": "public",
}
MANIFEST_KEYS = ("name", *CONFIG_FIELDS, "include", "exclude", "events")
MAX_EVENTS = 100  # what the gateway accepts in one declared set
EVENT_KEYS = ("name", *SOURCE_KINDS, "qualifier", "enabled")
_SOURCE_MODELS: dict[str, type[Any]] = {
    "object_store": ObjectStoreSource,
    "queue": QueueSource,
    "timer": TimerSource,
    "cloudevents": CloudEventsSource,
}
# Friendly source keys of the manifest -> the SubscriptionSpec field they stand for.
_SOURCE_ALIASES: dict[str, dict[str, str]] = {"queue": {"batch_window": "batch_window_s"}}
_DESTINATION_KEYS = ("function", "stream")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DURATION_KEYS = ("timeout", "max_event_age")  # seconds, or a string such as 30s, 15m, 6h
_KEY_OF_FIELD = {field: key for key, field in reversed(CONFIG_FIELDS.items())}  # handler -> 'handler'
_NUMERIC_KEYS = (
    "memory",
    "timeout",
    "concurrency",
    "min_instances",
    "max_instances",
    "max_retries",
    "max_event_age",
)
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
    # The declared event subscriptions; None when faas.yaml has no 'events' key (leave them alone).
    events: tuple[NamedSubscriptionSpec, ...] | None = None

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

    if "handler" in data and "entry" in data:
        problems.append(f"{where}: give 'entry' (an app's module:app) or 'handler' (a function's), not both")
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
        if key in _DURATION_KEYS and isinstance(value, str):
            try:
                value = parse_duration(value)
            except ValueError as exc:
                problems.append(f"{where}: field '{key}': {exc}")
                continue
        if key == "environment" and isinstance(value, dict):
            value, env_problems = _environment_strings(value)
            problems.extend(f"{where}: field 'environment': {p}" for p in env_problems)
        if key in ("on_success", "on_failure"):
            value, problem = _destination(value)
            if problem:
                problems.append(f"{where}: field '{key}': {problem}")
                continue
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

    events: tuple[NamedSubscriptionSpec, ...] | None = None
    if "events" in data:
        events, event_problems = parse_events(data["events"])
        problems.extend(f"{where}: {p}" for p in event_problems)

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
        events=events,
    )


def parse_duration(value: Any) -> float:
    """Seconds from a number (seconds) or a string ``2``, ``2s``, ``500ms``, ``1m``; ValueError if neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"must be a duration like 2s, 500ms, 1m or 6h (got {_show(value)})")
    if seconds < 0:
        raise ValueError(f"must not be negative (got {_show(value)})")
    return seconds


def parse_events(value: Any) -> tuple[tuple[NamedSubscriptionSpec, ...] | None, list[str]]:
    """The ``events`` list of a manifest as specs with their final names, and one line per problem."""
    if value is None:
        return (), []
    if not isinstance(value, list):
        return None, [f"field 'events': must be a list of event sources (got {_kind(value)})"]
    if len(value) > MAX_EVENTS:
        return None, [f"field 'events': at most {MAX_EVENTS} event sources (got {len(value)})"]
    problems: list[str] = []
    specs: list[NamedSubscriptionSpec] = []
    seen_kinds: dict[str, int] = {}
    first_use: dict[str, str] = {}  # name -> the item that used it first
    for index, item in enumerate(value):
        label = f"events[{index}]"
        kind, spec, item_problems = _parse_event(item, label)
        problems.extend(item_problems)
        if kind is None:
            continue
        seen_kinds[kind] = seen_kinds.get(kind, 0) + 1
        explicit = isinstance(item, dict) and item.get("name") is not None
        name = item["name"] if explicit else f"{kind.replace('_', '-')}-{seen_kinds[kind]}"
        if not isinstance(name, str):
            continue  # reported by _parse_event
        if name in first_use:
            what = f"name {name!r}" if explicit else f"default name {name!r} (give one of them a 'name')"
            problems.append(f"field '{label}.name': the {what} is already used by {first_use[name]}")
            continue
        first_use[name] = label
        if spec is not None:
            specs.append(NamedSubscriptionSpec(name=name, **spec.model_dump()))
    return (None if problems else tuple(specs)), problems


def _parse_event(item: Any, label: str) -> tuple[str | None, SubscriptionSpec | None, list[str]]:
    """One ``events`` item: its source kind (None when it has not exactly one), its spec when valid,
    and its problems."""
    if not isinstance(item, dict):
        sources = ", ".join(SOURCE_KINDS)
        return None, None, [f"field '{label}': must be a mapping with one of {sources} (got {_kind(item)})"]
    problems = [
        f"field '{label}': {_unknown_key(key, EVENT_KEYS, _source_of_key(key))}"
        for key in item
        if key not in EVENT_KEYS
    ]
    present = [kind for kind in SOURCE_KINDS if kind in item]
    if len(present) != 1:
        problems.append(
            f"field '{label}': needs exactly one source of {', '.join(SOURCE_KINDS)} "
            + (f"(got {', '.join(present)}; give each its own item)" if present else "(got none)")
        )
        return None, None, problems
    kind = present[0]

    name = item.get("name")
    if name is not None and not isinstance(name, str):
        problems.append(f"field '{label}.name': must be a string (got {_show(name)})")
    elif name is not None and (reason := name_problem(name, "subscription name")):
        problems.append(f"field '{label}.name': {reason}")

    data: dict[str, Any] = {}
    qualifier = item.get("qualifier")
    if isinstance(qualifier, int) and not isinstance(qualifier, bool):
        data["qualifier"] = str(qualifier)  # 'qualifier: 3' names version 3
    elif isinstance(qualifier, str):
        data["qualifier"] = qualifier
    elif qualifier is not None:
        problems.append(
            f"field '{label}.qualifier': must be a version number or an alias (got {_show(qualifier)})"
        )
    enabled = item.get("enabled", True)
    if isinstance(enabled, bool):
        data["enabled"] = enabled
    else:  # pydantic would take "yes" and 1
        problems.append(f"field '{label}.enabled': must be true or false (got {_show(enabled)})")

    source, user_keys, source_problems = _source(kind, item[kind])
    problems.extend(f"field '{label}.{kind}{where}': {reason}" for where, reason in source_problems)
    if source is None:
        return kind, None, problems
    data[kind] = source
    try:
        spec = SubscriptionSpec(**data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = [str(part) for part in error.get("loc") or ()]
            if len(loc) >= 2 and loc[0] == kind:
                loc[1] = user_keys.get(loc[1], loc[1])
            path = ".".join(part for part in [label, *loc] if part)
            problems.append(f"field '{path}': {error_reason(error)}")
        return kind, None, problems
    return kind, (None if problems else spec), problems


def _source(kind: str, value: Any) -> tuple[dict[str, Any] | None, dict[str, str], list[tuple[str, str]]]:
    """An item's source in ``SubscriptionSpec``'s terms; how the user spelled renamed fields (field ->
    key, "" for the source itself); problems as (".key" or "", reason)."""
    model = _SOURCE_MODELS[kind]
    aliases = _SOURCE_ALIASES.get(kind, {})
    if kind == "timer" and isinstance(value, str):  # timer: rate(5 minutes)
        return {"schedule": value}, {"schedule": ""}, []
    if kind == "cloudevents" and value is None:  # cloudevents: (every event)
        return {}, {}, []
    if not isinstance(value, dict):
        required = [f"'{f}'" for f, info in model.model_fields.items() if info.is_required()]
        needs = f" with {', '.join(required)}" if required else ""
        return None, {}, [("", f"must be a mapping{needs} (got {_kind(value)})")]
    allowed = (*model.model_fields, *aliases)
    shown = tuple(_user_key(field, aliases) for field in model.model_fields)
    problems: list[tuple[str, str]] = []
    out: dict[str, Any] = {}
    user_keys: dict[str, str] = {}
    for key, given in value.items():
        if key not in allowed:
            problems.append(("", _unknown_key(key, shown)))
            continue
        field = aliases.get(str(key), str(key))
        if field in user_keys:
            problems.append((f".{key}", f"gives {user_keys[field]!r} a second time"))
            continue
        user_keys[field] = key
        if field == "batch_window_s":
            try:
                given = parse_duration(given)
            except ValueError as exc:
                problems.append((f".{key}", str(exc)))
                continue
        elif field == "batch_size" and isinstance(given, bool):
            problems.append((f".{key}", f"must be a whole number (got {_show(given)})"))
            continue
        elif field == "events" and isinstance(given, str):
            given = [given]
        out[field] = given
    return out, user_keys, problems


def _user_key(field: str, aliases: dict[str, str]) -> str:
    return next((key for key, target in aliases.items() if target == field), field)


def _source_of_key(key: Any) -> str | None:
    """The source kind a misplaced key belongs under (``bucket`` -> ``object_store``), if any."""
    for kind, model in _SOURCE_MODELS.items():
        if key in model.model_fields or key in _SOURCE_ALIASES.get(kind, {}):
            return kind
    return None


def _unknown_key(key: Any, known: tuple[str, ...], belongs_under: str | None = None) -> str:
    if belongs_under:
        return f"unknown field '{key}' (it belongs under '{belongs_under}')"
    hint = difflib.get_close_matches(str(key), known, n=1)
    return f"unknown field '{key}'" + (
        f" (did you mean '{hint[0]}'?)" if hint else f" (known fields: {', '.join(known)})"
    )


def _destination(value: Any) -> tuple[Any, str | None]:
    """``on_success``/``on_failure`` as ``Destination`` data: the shorthand string becomes a mapping."""
    if value is None:
        return None, None
    if isinstance(value, str):
        target, sep, rest = value.partition(":")
        if sep and target in _DESTINATION_KEYS and rest:
            return {target: rest}, None
        return None, (
            f"must be 'function:NAME[:QUALIFIER]', 'stream:NAME' or a mapping with 'function' or "
            f"'stream' (got {_show(value)})"
        )
    if isinstance(value, dict):
        for key in value:
            if key not in _DESTINATION_KEYS:
                return None, _unknown_key(key, _DESTINATION_KEYS)
        return value, None
    return None, f"must be a mapping with 'function' or 'stream' (got {_kind(value)})"


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
            lines.append(f"field '{label}': {error_reason(error)}")
        elif "min_instances must be 1 or more" in str(error.get("msg", "")):
            lines.append("field 'min_instances': an app keeps at least one instance: min_instances must be 1 or more")
        elif "min_instances" in str(error.get("msg", "")) and isinstance(error.get("input"), dict):
            given = error["input"]
            low, high = (
                given.get(field, VersionConfig.model_fields[field].default)
                for field in ("min_instances", "max_instances")
            )
            lines.append(f"field 'min_instances': must not exceed max_instances (got {low} > {high})")
        else:
            lines.append(error_reason(error))
    return lines


def error_reason(error: Any) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) in the manifest's words."""
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
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false{got}"
    if kind == "too_short" and isinstance(error.get("input"), list):
        return "must not be empty"
    if kind == "string_too_short":
        return f"must not be empty{got}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters{got}"
    if kind == "list_type":
        return f"must be a list{got}"
    if kind == "extra_forbidden":
        return "unknown field"
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

"""Readable validation errors: the file, the field path, the bad value, and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class PipelineSpecError(ValueError):
    """A pipeline declaration is invalid; the message lists every problem with its location."""

    def __init__(self, source: str | Path, problems: list[str]):
        self.source = str(source)
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid nilus pipeline declaration in {self.source}:\n{listing}")


_CONNECTION_TAGS = ("postgres", "mysql", "duckdb", "bigquery")


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _CONNECTION_TAGS and path.count(".") >= 1 and path.startswith("connections"):
            continue  # the discriminated union's tag, not a field the user wrote
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _allowed_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Best effort: the fields of the model that holds an unknown field."""
    from nilus_dagster.spec.connections import (
        BigQueryConnection,
        DuckDBConnection,
        MySQLConnection,
        PostgresConnection,
    )

    if loc and loc[0] == "connections" and len(loc) >= 3:
        by_type = {
            "postgres": PostgresConnection,
            "mysql": MySQLConnection,
            "duckdb": DuckDBConnection,
            "bigquery": BigQueryConnection,
        }
        owner = by_type.get(str(loc[2]))
        return sorted(owner.model_fields) if owner else []
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        candidates = [annotation, *(inner or ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _describe(model: type[BaseModel], error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    where = _field_path(loc)
    if error["type"] == "extra_forbidden":
        allowed = _allowed_fields(model, loc)
        hint = f" (allowed fields: {', '.join(allowed)})" if allowed else ""
        if str(loc[-1]) in ("password", "dsn"):
            hint += "; secrets are never written in YAML: name an environment variable with password_env/dsn_env"
        return f"{where}: unknown field '{loc[-1]}'{hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    if not loc:
        return message
    value = error.get("input")
    shown = "" if isinstance(value, dict | list) else f" = {value!r}"
    return f"{where}{shown}: {message}"


def validate_spec(model: type[M], data: Any, source: str | Path) -> M:
    """Validate `data` as `model`, raising PipelineSpecError that names `source` on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PipelineSpecError(source, [_describe(model, e) for e in exc.errors()]) from None

"""Check a defs.yaml's text without loading or applying it: the problems `dg check defs` reports
for its NilusPipelines components (file, field, value, what to do), one record per problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from nilus_dagster.spec.errors import _describe, _field_path
from nilus_dagster.spec.loading import COMPONENT_TYPES, TemplateError, render_templates
from nilus_dagster.spec.project import PipelinesSpec


@dataclass(frozen=True)
class DefsProblem:
    file: str
    field: str
    value: Any
    message: str


@dataclass
class DefsCheck:
    specs: list[PipelinesSpec] = field(default_factory=list)
    problems: list[DefsProblem] = field(default_factory=list)

    @property
    def pipelines(self) -> list[str]:
        return [f"{p.tenant}/{p.name}" for s in self.specs for p in s.pipelines]


def _scalar(value: Any) -> Any:
    return None if isinstance(value, dict | list) else value


def check_defs_text(text: str, file: str = "defs.yaml") -> DefsCheck:
    """Every NilusPipelines document of `text` validated as the component would validate it
    (templates rendered in this process's environment, as `dg check defs` would render them here)."""
    check = DefsCheck()
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        check.problems.append(DefsProblem(file, "(document)", None, f"not valid YAML: {exc}"))
        return check
    ours = [d for d in documents if isinstance(d, dict) and d.get("type") in COMPONENT_TYPES]
    if not ours:
        found = [d.get("type") for d in documents if isinstance(d, dict)]
        check.problems.append(
            DefsProblem(file, "type", found[0] if found else None, f"no component of type {COMPONENT_TYPES[0]}")
        )
    for index, document in enumerate(ours):
        prefix = f"[document {index}] " if len(ours) > 1 else ""
        try:  # templates render as Dagster renders them when it loads the file
            attributes = render_templates(document.get("attributes") or {})
        except TemplateError as exc:
            check.problems.append(DefsProblem(file, f"{prefix}attributes", None, str(exc)))
            continue
        try:
            check.specs.append(PipelinesSpec.model_validate(attributes))
        except ValidationError as exc:
            for error in exc.errors():
                where = f"{prefix}attributes.{_field_path(tuple(error['loc']))}"
                message = _describe(PipelinesSpec, error)
                check.problems.append(DefsProblem(file, where, _scalar(error.get("input")), message))
    return check

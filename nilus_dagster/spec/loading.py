"""Read pipeline declarations straight from a defs folder (for the API and tools, without loading
Dagster definitions). Templates in the attributes (`{{ env.X }}`, `{{ env('X', 'default') }}`) are
rendered by Dagster's own component resolver, so they read exactly as Dagster loads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from nilus_dagster.spec.errors import PipelineSpecError, validate_spec
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec

COMPONENT_TYPES = ("nilus_dagster.components.NilusPipelines", "nilus_dagster.NilusPipelines")


@dataclass(frozen=True)
class DeclaredPipeline:
    pipeline: Pipeline
    spec: PipelinesSpec
    source_file: Path


def load_spec_file(path: Path) -> list[PipelinesSpec]:
    """Every NilusPipelines component declared in one defs.yaml (documents may be several)."""
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as exc:
        raise PipelineSpecError(path, [f"not valid YAML: {exc}"]) from None
    specs = []
    for document in documents:
        if not isinstance(document, dict) or document.get("type") not in COMPONENT_TYPES:
            continue
        attributes = _render_templates(document.get("attributes") or {}, path)
        specs.append(validate_spec(PipelinesSpec, attributes, path))
    return specs


class TemplateError(ValueError):
    """A `{{ ... }}` template in the attributes that Dagster cannot render (e.g. an unset env('X'))."""


def render_templates(attributes: object) -> object:
    """The attributes as Dagster's component loading resolves them (the same template scope)."""
    from dagster.components.resolved.context import ResolutionContext
    from dagster.components.resolved.errors import ResolutionException

    try:
        return ResolutionContext.default().resolve_value(attributes)
    except ResolutionException as exc:
        raise TemplateError(f"template: {exc}") from None


def _render_templates(attributes: object, path: Path) -> object:
    try:
        return render_templates(attributes)
    except TemplateError as exc:
        raise PipelineSpecError(path, [str(exc)]) from None


def load_declared_pipelines(defs_dir: Path) -> list[DeclaredPipeline]:
    """All pipelines under `defs_dir`, in file then declaration order."""
    declared = []
    for path in sorted(Path(defs_dir).rglob("defs.yaml")):
        for spec in load_spec_file(path):
            declared.extend(DeclaredPipeline(p, spec, path) for p in spec.pipelines)
    return declared

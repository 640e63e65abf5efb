"""`{{ env.X }}` templates in a defs.yaml read the same in the monitoring API's loader as in Dagster's."""

from __future__ import annotations

import uuid
from pathlib import Path

import dagster as dg
import pytest

from nilus_dagster.api.declarations import Declarations
from nilus_dagster.spec.check import check_defs_text
from nilus_dagster.spec.errors import PipelineSpecError
from nilus_dagster.spec.loading import load_declared_pipelines

DEFS = """\
type: nilus_dagster.components.NilusPipelines
attributes:
  connections:
    shop: {type: postgres, dsn_env: SHOP_DSN}
    warehouse: {type: duckdb, path: "{{ env.NILUS_T_WAREHOUSE }}"}
  pipelines:
    - name: orders
      tenant: "{{ env.NILUS_T_TENANT }}"
      labels: {team: "{{ env('NILUS_T_TEAM', 'nobody') }}"}
      source: {connection: shop, tables: [public.orders]}
      sink: {connection: warehouse, dataset: "{{ env.NILUS_T_DATASET }}_v2"}
"""


PROJECT = """\
[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "{module}"
defs_module = "{module}.defs"
registry_modules = ["nilus_dagster.components"]
"""


@pytest.fixture
def defs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Dagster project in tmp_path whose defs folder holds one templated defs.yaml (its module
    name is new in each test: Python keeps imported modules)."""
    module = f"templated_{uuid.uuid4().hex[:8]}"
    (tmp_path / "pyproject.toml").write_text(PROJECT.replace("{module}", module))
    folder = tmp_path / module / "defs" / "templated"
    folder.mkdir(parents=True)
    for package in (tmp_path / module, tmp_path / module / "defs"):
        (package / "__init__.py").write_text("")
    (folder / "defs.yaml").write_text(DEFS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, value in {"NILUS_T_TENANT": "globex", "NILUS_T_DATASET": "sales", "NILUS_T_WAREHOUSE": "w.duckdb",
                        "SHOP_DSN": "postgresql://nobody@127.0.0.1:1/shop",
                        "NILUS_STATE_DSN": "postgresql://nobody@127.0.0.1:1/state"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NILUS_T_TEAM", raising=False)
    return tmp_path / module / "defs"


def test_the_api_reads_templates_as_dagster_does(defs_dir: Path) -> None:
    defs = dg.load_from_defs_folder(path_within_project=defs_dir)
    [spec] = [s for s in defs.resolve_all_asset_specs() if "sources" not in s.key.path]
    assert spec.key == dg.AssetKey(["globex", "orders", "public", "orders"])
    assert spec.metadata["dagster/table_name"].value == "sales_v2.orders"
    assert spec.tags["team"] == "nobody"

    [pipeline] = Declarations(defs_dir).for_tenant("globex")
    assert (pipeline.tenant, pipeline.sink.dataset, pipeline.labels) == ("globex", "sales_v2", {"team": "nobody"})


def test_a_template_error_names_the_file(defs_dir: Path) -> None:
    (defs_dir / "templated" / "defs.yaml").write_text(DEFS.replace("env.NILUS_T_TENANT", "env('NILUS_T_UNSET')"))
    with pytest.raises(PipelineSpecError, match=r"templated/defs\.yaml.*\n.*NILUS_T_UNSET is not set"):
        load_declared_pipelines(defs_dir)
    with pytest.raises(Exception) as dagster_error:  # noqa: PT011 - Dagster wraps the resolver's error
        dg.load_from_defs_folder(path_within_project=defs_dir)
    chain = [dagster_error.value]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    assert any("NILUS_T_UNSET is not set" in str(e) for e in chain)


def test_the_validate_check_renders_templates_as_dagster_does(defs_dir: Path) -> None:
    """`POST /validate` (check_defs_text) sees the rendered values, as `dg check defs` does."""
    check = check_defs_text(DEFS, "defs.yaml")
    assert check.problems == []
    assert check.pipelines == ["globex/orders"]

    check = check_defs_text(DEFS.replace("env.NILUS_T_TENANT", "env('NILUS_T_UNSET')"), "defs.yaml")
    [problem] = check.problems
    assert (problem.file, problem.field) == ("defs.yaml", "attributes")
    assert "NILUS_T_UNSET is not set" in problem.message

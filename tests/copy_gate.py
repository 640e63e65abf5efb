"""A gate in the snapshot reader, for tests that must act while a table's copy is under way.

`install(folder, table)` makes every snapshot read of `table` (in this process) create
`folder/reached` and wait until `folder/release` exists. The crash tests' worker installs it
when NILUS_TEST_COPY_GATE names a folder (and NILUS_TEST_COPY_GATE_TABLE a table).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

import nilus_dagster.cdc.snapshot as snapshot_module
from nilus_dagster.schema import TableSchema


def install(folder: Path, table: str) -> None:
    read = snapshot_module.read_table

    def gated(conn: Any, schema: TableSchema, **options: Any) -> Iterator[pa.RecordBatch]:
        if schema.table.qualified == table:
            (folder / "reached").touch()
            while not (folder / "release").exists():
                time.sleep(0.02)
        yield from read(conn, schema, **options)

    snapshot_module.read_table = gated  # type: ignore[assignment]


def reached(folder: Path) -> bool:
    return (folder / "reached").exists()


def release(folder: Path) -> None:
    (folder / "release").touch()

"""Pass record batches through while counting them and remembering a source failure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa


class CountingBatches:
    """Iterates `batches` once, counting rows and Arrow bytes.

    When the source iterator raises inside a database driver (DuckDB scanning an Arrow stream), the
    driver reports its own error; `reraise_source_error` re-raises the original exception instead,
    so callers see the source's failure, not the sink's.
    """

    def __init__(self, batches: Iterable[pa.RecordBatch]) -> None:
        self._batches = batches
        self.rows = 0
        self.bytes = 0
        self.source_error: BaseException | None = None

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            for batch in self._batches:
                self.rows += batch.num_rows
                self.bytes += batch.nbytes
                yield batch
        except GeneratorExit:
            raise
        except BaseException as e:
            self.source_error = e
            raise

    def reraise_source_error(self) -> None:
        if self.source_error is not None:
            raise self.source_error

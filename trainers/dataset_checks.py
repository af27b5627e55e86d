"""Checks of a dataset's rows before tokenisation, shared by the trainers, `extract_logps` and the CLI.

TRL's tokenisation meets a null value (a JSON ``null`` or a key missing from a row) as
``AttributeError: 'NoneType' object has no attribute ...``, naming no row and no column; an unpaired label of
2, -1 or 0.5 is counted as desirable. These checks name the row and the column instead, before any work. They
read a `datasets.Dataset` through Arrow (a null count per column and batch, no Python rows); any other dataset
(an `IterableDataset`, a list) is not inspected here.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

#: Rows per Arrow batch read by the checks.
_BATCH_ROWS = 65536


def _arrow_batches(dataset, columns: list[str]) -> Optional[Iterator[tuple[int, object]]]:
    """``(first row index, pyarrow.Table)`` batches of ``columns`` of a `datasets.Dataset` in row order (its
    indices mapping, if any, applied), or None when ``dataset`` is not one."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return None

    def batches():
        start = 0
        for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_BATCH_ROWS):
            yield start, table
            start += table.num_rows

    return batches()


def check_no_nulls(dataset, columns: Iterable[str], where: str) -> None:
    """Raise ValueError naming the first row and column of ``dataset`` that hold a null (None / missing) value.

    ``columns`` absent from the dataset are skipped (the column check names them); ``where`` starts the
    message, e.g. ``"FusedDPOTrainer: the train dataset"``.
    """
    import pyarrow.compute as pc

    names = [c for c in columns if c in (getattr(dataset, "column_names", None) or ())]
    batches = _arrow_batches(dataset, names) if names else None
    if batches is None:
        return
    for start, table in batches:
        found = []  # (row, column) of the first nulls of each column, earliest first
        for name in names:
            column = table.column(name)
            if column.null_count:
                found += [(start + int(i), name) for i in pc.indices_nonzero(pc.is_null(column)).to_pylist()[:5]]
        if found:
            found.sort()
            row, name = found[0]
            more = f" (first ones: {', '.join(f'row {r} {c!r}' for r, c in found[:5])})" if len(found) > 1 else ""
            raise ValueError(
                f"{where} has a null (None or missing) value in column {name!r} at row {row}{more}: expected a "
                f"value in every row (text, a list of messages or token ids). Fill in or drop those rows."
            )


def check_binary_labels(dataset, column: str, where: str) -> None:
    """Raise ValueError unless ``dataset[column]`` holds only True/False or 0/1 (an unpaired preference label),
    naming the first offending row and value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in (getattr(dataset, "column_names", None) or ()):
        return
    batches = _arrow_batches(dataset, [column])
    if batches is None:
        return
    for start, table in batches:
        values = table.column(column)
        if pa.types.is_boolean(values.type):
            continue
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_null(values.type)):
            raise ValueError(
                f"{where}: column {column!r} must hold True/False (or 0/1) labels, desirable or not; got values of "
                f"type {values.type} (row {start}: {values[0].as_py()!r})"
            )
        bad = pc.invert(pc.fill_null(pc.is_in(values, value_set=pa.array([0, 1], type=values.type)), True))
        if pc.any(bad).as_py():
            index = int(pc.indices_nonzero(bad)[0].as_py())
            raise ValueError(
                f"{where}: column {column!r} must hold True/False (or 0/1) labels, desirable or not; got "
                f"{values[index].as_py()!r} at row {start + index}"
            )


def check_rows(dataset, columns: Iterable[str], where: str) -> None:
    """`check_no_nulls` on ``columns`` and, when one of them is ``"label"``, `check_binary_labels`."""
    columns = list(columns)
    check_no_nulls(dataset, columns, where)
    if "label" in columns:
        check_binary_labels(dataset, "label", where)


def check_not_empty(dataset, where: str) -> None:
    """Raise ValueError when ``dataset`` has a length and it is 0."""
    try:
        size = len(dataset)
    except TypeError:  # an IterableDataset has no length
        return
    if size == 0:
        raise ValueError(f"{where} is empty: expected at least one row")

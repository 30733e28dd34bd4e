"""Reading rows from local files, saved `datasets` folders or the hub.

Local files are read here rather than through `datasets.load_dataset` because its errors for a bad
line don't say which line; tunelab's do (`data.jsonl:30001: malformed JSON ...`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """Unusable data, said in one line with the file and line."""


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        f"convert the file to UTF-8") from None


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line of JSON Lines text.

    Splits only at "\\n", as the JSON Lines format says: str.splitlines() also splits at U+2028, U+2029,
    U+0085 and other separators that json.dumps(ensure_ascii=False) leaves raw inside strings, which
    cut valid rows in two. A trailing "\\r" (CRLF files) is JSON whitespace and harmless.
    """
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield n, line


def parse_jsonl(text: str, source: str | Path, error: type[Exception] | None = None) -> list[tuple[int, Any]]:
    """Every non-blank line of JSON Lines text parsed, as (line number, value).

    The one JSON Lines reader of tunelab (data files, benchmark files, prompt files, compare folders).
    A malformed line raises `error` (DataError by default) as "source:line: malformed JSON (...)".
    """
    error = error or DataError
    out = []
    for n, line in jsonl_lines(text):
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{source}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
    return out


def read_jsonl(path: Path, error: type[Exception] | None = None) -> list[dict]:
    """A JSON Lines file of objects; each row carries `__line__`. Errors name file:line.

    A JSON array saved under a .jsonl name (a common slip) is detected and read as the array it is.
    """
    error = error or DataError
    if not path.exists():
        raise error(f"{path}: file not found")
    try:
        text = _decode(path)
    except DataError as e:
        raise error(str(e)) from None
    if text.lstrip().startswith("["):
        rows = _json_array(text, path, error)
        if rows is not None:
            return rows
    rows = []
    for n, row in parse_jsonl(text, path, error):
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        row["__line__"] = n
        rows.append(row)
    return rows


def _json_array(text: str, path: Path, error: type[Exception]) -> list[dict] | None:
    """The rows of text that is one JSON array of objects, else None (then it is read as JSON Lines)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = next(jsonl_lines(text))[1]
        try:
            json.loads(first)
        except json.JSONDecodeError:  # not JSON Lines either: say what the file looks like
            raise error(f"{path}:{e.lineno}: this .jsonl file holds a JSON array (it starts with '['), not JSON "
                        f"Lines, and the array is malformed ({e.msg} at column {e.colno})") from None
        return None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        return None
    for i, row in enumerate(data):
        row["__line__"] = i + 1  # the row's number: a JSON array has no line per row
    return data


def _read_json(path: Path) -> list[dict]:
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.lineno > 1 and text.lstrip().startswith("{"):  # maybe JSON Lines with a .json name
            return read_jsonl(path)
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1} is not an object")
        row["__line__"] = i + 1
    return data


def _read_csv(path: Path) -> list[dict]:
    # newline="" as the csv module asks: a newline inside a quoted field is part of the value
    reader = csv.reader(io.StringIO(_decode(path), newline=""), strict=True)
    rows: list[dict] = []
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header ({e})") from None
    if len(set(header)) != len(header):
        raise DataError(f"{path}:1: duplicate column names in the header: {header}")
    while True:
        start = reader.line_num + 1  # a quoted field can span lines: name the line the row starts on
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        if not values:
            continue
        if len(values) != len(header):
            raise DataError(f"{path}:{start}: {len(values)} columns, the header has {len(header)}")
        row: dict[str, Any] = dict(zip(header, values))
        row["__line__"] = start
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: can't read Parquet ({str(e).splitlines()[0][:160]})") from None
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        row["__line__"] = i + 1
    return rows


READERS = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_rows(spec: str, split: str = "train", base: Path | None = None) -> list[dict]:
    """All rows of a data source as dicts. Each row carries `__line__` for error messages."""
    path = Path(spec).expanduser()
    if base is not None and not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported data file type '{path.suffix}' "
                            f"(use {', '.join(READERS)} or a saved datasets folder)")
        try:
            rows = reader(path)
        except PermissionError:
            raise DataError(f"{path}: permission denied") from None
        if not rows:
            raise DataError(f"{path}: no rows")
        return rows
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a folder saved with datasets' save_to_disk "
                            f"({str(e).splitlines()[0][:160]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}' (has: {', '.join(ds)})")
            ds = ds[split]
        rows = [dict(r, __line__=i + 1) for i, r in enumerate(ds)]
        if not rows:
            raise DataError(f"{path}: no rows")
        return rows
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or Path(spec).suffix.lower() in READERS:
        raise DataError(f"data.path: file not found: {spec}")
    return _read_hub(spec, split)


def _read_hub(repo_id: str, split: str) -> list[dict]:
    import datasets

    from ..models import hub_reachable

    online = hub_reachable()  # a few seconds at most; datasets alone retries for ~30 s when offline
    try:
        with _hub_offline(not online):
            ds = datasets.load_dataset(repo_id, split=split, download_mode="reuse_dataset_if_exists")
    except Exception as e:
        if not online:
            raise DataError(f"data.path: '{repo_id}' is not a local file, not in the local datasets cache, and the "
                            f"hub is unreachable (offline); download it elsewhere and point data.path at the file"
                            ) from None
        raise DataError(f"data.path: can't load hub dataset '{repo_id}' ({str(e).splitlines()[0][:160]})") from None
    return [dict(r, __line__=i + 1) for i, r in enumerate(ds)]


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """HF_HUB_OFFLINE for one load_dataset call: the cache is used and the network not tried. Set on the
    libraries' config modules because both read the environment variable once, at import."""
    import datasets
    import huggingface_hub.constants as hub_constants

    if not offline:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved

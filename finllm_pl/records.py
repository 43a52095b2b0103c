"""Reading rows from user files, with checks whose errors name the file and line.

Every bad row raises `DataError("path:line: what is wrong; what to do")`: the CLI prints that one line and exits
non-zero, so a user with a 13,000-row file finds the broken row at once instead of reading a traceback.

Formats (by extension): `.jsonl`/`.json` (one JSON object per line), `.csv` (a header row), anything else
plain text, one row per line (prediction input only). Rows are streamed, so a file of millions of rows is read
in bounded memory.

Row schemas:
  - instruction rows: {"instruction": str, "input": str (optional), "output": str}  (the seed's format)
  - text rows:        {"text": str, "label": str (optional)}; the configured instruction is used
  - CSV:              a text column (and optionally a label column); plain text: the whole line is the text
An optional "id" (string or integer) is carried to the output; it must be unique. A row without one gets its
1-based line number as id (CSV: the line its record starts on), so output rows join back to the input. Blank lines
are skipped and count as lines.

`keep_fields` (predict's data.keep_fields): input fields carried to each output row, as they are in the input
(JSONL values keep their JSON types; CSV cells are strings). "text" is the input text in every format (and the only
field of a plain-text row); "id" is checked to be on every row and is the output's id. A row without one of them is
an error naming the file, line and field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .errors import DataError

MAX_LINE_BYTES = 1 << 20  # a 1 MiB "sentence" is a broken file, not a sentence


@dataclass
class Row:
    index: int  # 0-based position among the file's data rows (output order)
    line: int  # 1-based line the row (a CSV record: its first line) is on; blank lines count
    id: str  # the row's own "id", else str(line)
    instruction: str
    input: str
    output: Optional[str]  # the answer / gold label; None when the file has none
    fields: dict[str, Any] = field(default_factory=dict)  # the kept input fields (keep_fields), "id" aside


def file_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(ext, "text")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) pairs; a UTF-8 BOM is dropped, non-UTF-8 bytes are an error."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file; check the path in the config or command line")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a data file; point to a .jsonl, .csv or .txt file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{path}:{n}: line is {len(raw) / 2**20:.1f} MiB, over the {MAX_LINE_BYTES >> 20} MiB limit per "
                    "row; the file is probably not one row per line (split or fix it)"
                )
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "re-save the file as UTF-8"
                ) from None


def _str_field(path: str, n: int, obj: dict, key: str, required: bool, allow_empty: bool = True) -> Optional[str]:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f'{path}:{n}: missing field "{key}"; every row needs it (see data/README.md)')
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f'{path}:{n}: field "{key}" must be a string, got {type(value).__name__} {json.dumps(value)[:40]}; '
                        'put the value in quotes')
    if not allow_empty and not value.strip():
        raise DataError(f'{path}:{n}: field "{key}" is empty; give it text or remove the row')
    return value


def _kept(path: str, n: int, obj: dict, text: str, keep: Sequence[str]) -> dict[str, Any]:
    """The kept fields of a JSON row: "text" is the input text, "id" only has to be there (it is the output id)."""
    fields = {}
    for key in keep:
        if key == "text":
            fields[key] = text
        elif key not in obj:
            raise DataError(f'{path}:{n}: no field "{key}" in this row; data.keep_fields asks for it on every row '
                            "(add it, or remove it from data.keep_fields)")
        elif key != "id":
            fields[key] = obj[key]
    return fields


def _json_rows(path: str, instruction: str, need_output: bool, keep: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                            "fix or remove the line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}; make each line "
                            'one {"text": ...} or {"instruction": ..., "input": ..., "output": ...} object')
        if "instruction" in obj or "output" in obj:
            row = {
                "instruction": _str_field(path, n, obj, "instruction", True, allow_empty=False),
                "input": _str_field(path, n, obj, "input", False) or "",
                "output": _str_field(path, n, obj, "output", need_output, allow_empty=False),
            }
        elif "text" in obj:
            row = {
                "instruction": instruction,
                "input": _str_field(path, n, obj, "text", True, allow_empty=False),
                "output": _str_field(path, n, obj, "label", need_output, allow_empty=False),
            }
        else:
            raise DataError(
                f'{path}:{n}: row has neither "instruction"/"output" nor "text" fields (keys: {", ".join(obj) or "none"}); '
                "see data/README.md for the schema"
            )
        if "id" in obj:
            if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
                raise DataError(f'{path}:{n}: field "id" must be a string or an integer, got '
                                f'{type(obj["id"]).__name__}; fix it or drop the id field')
            row["id"] = str(obj["id"])
        if keep:
            row["fields"] = _kept(path, n, obj, row["input"], keep)
        yield n, row


def _csv_rows(path: str, instruction: str, text_column: str, label_column: str, need_output: bool,
              keep: Sequence[str] = ()):
    for _ in _lines(path):  # the same UTF-8 / line-length checks, before csv sees the text
        pass
    start: list[Optional[int]] = [None]  # the line the record being read starts on (csv reads line by line)

    def numbered(f) -> Iterator[str]:
        for n, line in enumerate(f, start=1):
            if start[0] is None and line.rstrip("\r\n"):  # (csv skips empty lines; a record starts on the next)
                start[0] = n
            yield line

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(numbered(f))
        columns = reader.fieldnames or []
        header, start[0] = start[0] or 1, None
        if text_column not in columns:
            raise DataError(
                f"{path}:{header}: no column '{text_column}' (columns: {', '.join(columns) or 'none'}); "
                "set data.text_column to the column that holds the text"
            )
        if need_output and label_column not in columns:
            raise DataError(f"{path}:{header}: no column '{label_column}' for the answers; set data.label_column")
        for key in keep:
            if key != "text" and key not in columns:
                raise DataError(f"{path}:{header}: no column '{key}' (columns: {', '.join(columns)}); "
                                "data.keep_fields asks for it (remove it from data.keep_fields, or fix the header)")
        for rec in reader:
            n, start[0] = start[0] or reader.line_num, None
            text = rec.get(text_column)
            if text is None or not text.strip():
                raise DataError(f"{path}:{n}: column '{text_column}' is empty; give it text or remove the row")
            label = rec.get(label_column) or None
            if need_output and label is None:
                raise DataError(f"{path}:{n}: column '{label_column}' is empty")
            row = {"instruction": instruction, "input": text, "output": label}
            if rec.get("id"):
                row["id"] = rec["id"]
            if keep:
                row["fields"] = fields = {}
                for key in keep:
                    value = text if key == "text" else rec.get(key)
                    if value is None:
                        raise DataError(f"{path}:{n}: no value for column '{key}' (the row has fewer fields than the "
                                        "header); fix the row, or remove it from data.keep_fields")
                    if key == "id" and not value:
                        raise DataError(f"{path}:{n}: column 'id' is empty; data.keep_fields asks for the row's id "
                                        "(give every row one, or remove id from data.keep_fields)")
                    if key != "id":
                        fields[key] = value
            yield n, row


class _SeenIds:
    """The ids met so far, for the duplicate check, at ~8 bytes per row: 64-bit digests in sorted numpy runs.

    A set of a million id strings costs ~100 MB, which a labeling job over millions of rows cannot afford; this
    costs 8 MB. Runs merge when they reach the size of the one before (log(n) runs, n log n work in all). A digest
    match only means "maybe": the caller confirms it on the text before reporting a duplicate.
    """

    BLOCK = 1 << 16

    def __init__(self) -> None:
        self.recent: set[int] = set()
        self.runs: list[np.ndarray] = []

    @staticmethod
    def digest(rid: str) -> int:
        return int.from_bytes(hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")

    def __contains__(self, digest: int) -> bool:
        if digest in self.recent:
            return True
        d = np.uint64(digest)
        for run in self.runs:
            i = int(run.searchsorted(d))
            if i < len(run) and run[i] == d:
                return True
        return False

    def add(self, digest: int) -> None:
        self.recent.add(digest)
        if len(self.recent) >= self.BLOCK:
            run = np.sort(np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent = set()
            while self.runs and len(self.runs[-1]) <= len(run):
                run = np.sort(np.concatenate([self.runs.pop(), run]))
            self.runs.append(run)


def iter_rows(
    path: str,
    instruction: str,
    need_output: bool = True,
    labels: Optional[Sequence[str]] = None,
    text_column: str = "text",
    label_column: str = "label",
    keep_fields: Sequence[str] = (),
) -> Iterator[Row]:
    """Stream checked rows from `path`. `labels`: when given, every answer must be one of them. `keep_fields`:
    input fields each row carries (Row.fields; see the module's docstring)."""
    fmt = file_format(path)
    if fmt == "text" and need_output:
        raise DataError(f"{path}: plain-text files have no answers; training and validation need .jsonl or .csv")
    keep = list(keep_fields)

    def text_rows() -> Iterator[tuple[int, dict]]:
        for n, line in _lines(path):
            if not line.strip():
                continue
            text = line.rstrip("\r\n")
            other = next((key for key in keep if key != "text"), None)
            if other is not None:
                raise DataError(f"{path}:{n}: plain-text rows have only the field 'text', not '{other}'; remove it "
                                "from data.keep_fields (or give a .jsonl or .csv file)")
            row = {"instruction": instruction, "input": text, "output": None}
            if keep:
                row["fields"] = {"text": text}
            yield n, row

    def rows() -> Iterator[tuple[int, dict]]:
        if fmt == "jsonl":
            return _json_rows(path, instruction, need_output, keep)
        if fmt == "csv":
            return _csv_rows(path, instruction, text_column, label_column, need_output, keep)
        return text_rows()

    source = rows()
    seen = _SeenIds()
    index = -1
    for index, (n, r) in enumerate(source):
        out = r["output"].strip() if r["output"] is not None else None
        if labels is not None and out is not None and out not in labels:
            raise DataError(
                f"{path}:{n}: answer {out!r} is not one of {'/'.join(labels)}; fix the row or set data.labels"
            )
        rid = r.get("id", str(n))
        if "id" in r:
            digest = seen.digest(rid)
            if digest in seen:  # confirm on the text (a digest collision is not a duplicate): rare, so a rescan
                first = next((m for m, other in rows() if m < n and other.get("id") == rid), None)
                if first is not None:
                    raise DataError(f"{path}:{n}: duplicate id {rid!r} (first at line {first}); ids must be unique "
                                    "(or drop the id field)")
            seen.add(digest)
        yield Row(index, n, rid, r["instruction"], r["input"], out, r.get("fields", {}))
    if index < 0:
        raise DataError(f"{path}: no rows (the file is empty); give it at least one row")


__all__ = ["DataError", "Row", "iter_rows", "file_format"]

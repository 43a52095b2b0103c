"""Convert public financial sentiment data sets to the project's instruction JSONL.

    python -m finllm_pl.prepare fpb Sentences_50Agree.txt --out data/fpb.jsonl
    python -m finllm_pl.prepare tfns sent_train.csv --out data/tfns.jsonl --test-size 0
    python -m finllm_pl.prepare fiqa task1_headline_ABSA_train.json --out data/fiqa.jsonl
    python -m finllm_pl.prepare generic my.csv --out data/my.jsonl \\
        --text-column headline --label-column score --label-map '{"-1":"negative","0":"neutral","1":"positive"}'

Each output row is {"instruction", "input", "output", "source"} (+ "id" where the data set has one).
Plain stdlib on purpose: converting data must not need torch, Lightning or a GPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from .files import atomic_file

LABELS = ("negative", "neutral", "positive")
# FinGPT's wording, kept verbatim so our results compare with theirs.
DEFAULT_INSTRUCTION = (
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
)
# The TFNS dataset card: 0 = Bearish, 1 = Bullish, 2 = Neutral (note: not in label order).
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}


class PrepareError(Exception):
    """Bad input: reported as one line `error: FILE:LINE: problem; fix`, never as a traceback."""

    def __init__(self, path, line: int | None, problem: str, fix: str):
        self.path, self.line, self.problem, self.fix = str(path), line, problem, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.problem}; {self.fix}"


def _read_text(path, encoding: str) -> str:
    """Whole file as text. These files are a few MB at most, and having the text lets us turn a
    decode error's byte offset into a line number."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "file not found"
        raise PrepareError(path, None, what, "check the path given on the command line")
    data = p.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PrepareError(path, line, f"not valid {encoding} text", "re-save the file as UTF-8") from None


def clean_text(text, path, line: int, what: str = "") -> str:
    if not isinstance(text, str) or not text.strip():
        raise PrepareError(path, line, f"{what}empty or missing text", "fill in the text or delete the row")
    return text.strip()


# --- Financial PhraseBank --------------------------------------------------------------------

def read_fpb(path) -> Iterator[dict]:
    """FPB release file: latin-1, CRLF, one `sentence@label` per line."""
    text = _read_text(path, "latin-1")  # latin-1 decodes any byte, so this never fails
    # Split on "\n" only: str.splitlines() would also split on U+0085, which is a valid latin-1 byte.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        # Split on the LAST '@': sentences may contain '@' (e-mail addresses), labels never do.
        sentence, sep, label = line.rpartition("@")
        if not sep:
            raise PrepareError(path, lineno, "no '@' between sentence and label",
                               "FPB lines look like 'sentence@neutral' (is this Sentences_*Agree.txt?)")
        label = label.strip()
        if label not in LABELS:
            raise PrepareError(path, lineno, f"unknown label {label!r}",
                               "FPB labels are negative, neutral or positive")
        yield {"text": clean_text(sentence, path, lineno), "label": label, "source": "fpb"}


# --- CSV (TFNS and generic) ------------------------------------------------------------------

def csv_records(path, required: Iterable[str], fix: str) -> Iterator[tuple[int, int, dict]]:
    """Yield (first line of the record, record number, row dict). Quoted fields may span lines, so
    the line where a record starts is tracked separately from csv's running line count."""
    text = _read_text(path, "utf-8-sig")  # -sig: spreadsheets like to prepend a BOM
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, record, start = None, 0, 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if header is None:
                header = [cell.strip() for cell in row]
                missing = [c for c in required if c not in header]
                if missing:
                    raise PrepareError(path, line, f"no {missing[0]!r} column (header: {', '.join(header)})", fix)
                continue
            record += 1
            if len(row) != len(header):
                raise PrepareError(path, line, f"record {record} has {len(row)} fields, the header has "
                                   f"{len(header)}", "quote fields that contain commas")
            yield line, record, dict(zip(header, row))
    except csv.Error as e:
        raise PrepareError(path, reader.line_num, f"malformed CSV ({e})",
                           "check the quotes on this record") from None


def read_tfns(path) -> Iterator[dict]:
    """Twitter Financial News Sentiment CSV: header `text,label`, labels 0/1/2."""
    for line, n, rec in csv_records(path, ("text", "label"), "a TFNS CSV has the header 'text,label'"):
        raw = rec["label"].strip()
        if raw not in TFNS_LABELS:
            raise PrepareError(path, line, f"record {n}: label {raw!r} is not 0, 1 or 2",
                               "TFNS labels are 0 = Bearish, 1 = Bullish, 2 = Neutral")
        # Keep line breaks inside a tweet: they are part of the text the model will see.
        yield {"text": clean_text(rec["text"], path, line, f"record {n}: "),
               "label": TFNS_LABELS[raw], "source": "tfns"}


# --- FiQA 2018 task 1 ------------------------------------------------------------------------

def fiqa_label(score: float) -> str:
    """FinGPT's thresholds: exactly -0.1 is neutral, exactly 0.1 is positive."""
    if score < -0.1:
        return "negative"
    if score < 0.1:
        return "neutral"
    return "positive"


def to_float(value) -> float | None:
    if isinstance(value, bool):  # bool is an int in Python; true/false is not a score
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if math.isfinite(score) else None


def read_fiqa(path) -> Iterator[dict]:
    """FiQA task 1 JSON: {id: {"sentence", "info": [{"sentiment_score", ...}]}}; the first info wins."""
    text = _read_text(path, "utf-8-sig")
    fix = "FiQA task 1 data is one JSON object keyed by id, each with 'sentence' and 'info'"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrepareError(path, e.lineno, f"not valid JSON ({e.msg}, column {e.colno})", fix) from None
    if not isinstance(data, dict):
        raise PrepareError(path, 1, f"top level is a JSON {type(data).__name__}, not an object", fix)
    pos = 0
    for key, item in data.items():
        # json gives no line numbers for values; find the key in the text (searching onwards from
        # the previous one, so the search stays linear and repeated text can't send us backwards).
        m = re.compile(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:").search(text, pos)
        pos = m.end() if m else pos
        line = text.count("\n", 0, m.start()) + 1 if m else 1
        if not isinstance(item, dict) or not isinstance(item.get("sentence"), str):
            raise PrepareError(path, line, f"entry {key!r} has no 'sentence'", fix)
        info = item.get("info")
        if not (isinstance(info, list) and info and isinstance(info[0], dict) and "sentiment_score" in info[0]):
            raise PrepareError(path, line, f"entry {key!r} has no info[0].sentiment_score", fix)
        raw = info[0]["sentiment_score"]
        score = to_float(raw)
        if score is None:
            raise PrepareError(path, line, f"entry {key!r}: sentiment_score {raw!r} is not a number",
                               "scores are numbers (or numeric strings) between -1 and 1")
        yield {"text": clean_text(item["sentence"], path, line, f"entry {key!r}: "),
               "label": fiqa_label(score), "source": "fiqa", "id": str(key)}


# --- generic CSV / JSONL ---------------------------------------------------------------------

def jsonl_records(path) -> Iterator[tuple[int, int, dict]]:
    text = _read_text(path, "utf-8-sig")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(path, lineno, f"not valid JSON ({e.msg})", "one JSON object per line") from None
        if not isinstance(obj, dict):
            raise PrepareError(path, lineno, "line is not a JSON object", "one JSON object per line")
        yield lineno, lineno, obj


def read_generic(path, text_column: str, label_column: str, label_map: dict | None = None,
                 fmt: str | None = None, source: str | None = None) -> Iterator[dict]:
    """Any CSV/JSONL with a text and a label column. Raw labels go through `label_map` (keys are
    the raw values as strings, e.g. "0"); without a map they must already be label names."""
    suffix = Path(path).suffix.lower()
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(suffix)
    if fmt not in ("csv", "jsonl"):
        raise PrepareError(path, None, f"cannot tell the format from {suffix or 'no extension'!r}",
                           "pass --format csv or --format jsonl")
    if label_map is not None:
        bad = sorted({str(v) for v in label_map.values()} - set(LABELS))
        if bad:
            raise PrepareError("--label-map", None, f"maps to unknown label {bad[0]!r}",
                               "map every raw label to negative, neutral or positive")
    source = source or Path(path).stem
    cols = (text_column, label_column)
    if fmt == "csv":
        records = csv_records(path, cols, "pick --text-column/--label-column from the header")
    else:
        records = jsonl_records(path)
    for line, n, rec in records:
        for col in cols:
            if col not in rec:
                raise PrepareError(path, line, f"record {n} has no {col!r} field",
                                   "check --text-column/--label-column")
        raw = rec[label_column]
        # JSON numbers become their JSON spelling (0 -> "0") so --label-map keys are plain strings.
        key = raw.strip() if isinstance(raw, str) else json.dumps(raw)
        if label_map is not None:
            if key not in label_map:
                raise PrepareError(path, line, f"record {n}: label {key!r} is not in --label-map",
                                   f"add it to the map (its keys: {', '.join(label_map)})")
            label = label_map[key]
        else:
            label = key.lower()
            if label not in LABELS:
                raise PrepareError(path, line, f"record {n}: label {key!r} is not negative/neutral/positive",
                                   """map raw labels with --label-map '{"0":"negative",...}'""")
        yield {"text": clean_text(rec[text_column], path, line, f"record {n}: "),
               "label": label, "source": source}


# --- instruction rows, split, output ---------------------------------------------------------

def to_instruction(row: dict, instruction: str = DEFAULT_INSTRUCTION) -> dict:
    out = {"instruction": instruction, "input": row["text"], "output": row["label"]}
    for extra in ("source", "id"):
        if row.get(extra) is not None:
            out[extra] = row[extra]
    return out


def stratified_split(rows: Iterable[dict], test_size: float, seed: int, key: str = "label"):
    """Per label, shuffle with one seeded RNG and send round(n * test_size) rows to test, so every
    label keeps its share in both parts. Each part keeps the input's order (diffs stay readable)."""
    rows = list(rows)
    if not 0 <= test_size < 1:
        raise ValueError(f"test_size must be in [0, 1), got {test_size}")
    by_label: dict = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row[key], []).append(i)
    rng = random.Random(seed)
    test_idx: set[int] = set()
    for label in sorted(by_label, key=str):  # sorted: the result must not depend on dict order
        idx = by_label[label][:]
        rng.shuffle(idx)
        test_idx.update(idx[: round(len(idx) * test_size)])
    train = [r for i, r in enumerate(rows) if i not in test_idx]
    test = [r for i, r in enumerate(rows) if i in test_idx]
    return train, test


def write_jsonl_atomic(rows: Iterable[dict], path) -> int:
    """Write `rows` as JSONL, atomically (files.atomic_file): readers and a crash see the old file or the whole new
    one, never half of it. Returns the number of rows written."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PrepareError(path, None, f"output folder {str(path.parent)!r} does not exist",
                           "create it first (mkdir -p) or choose another --out")
    n = 0
    try:
        with atomic_file(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    except OSError as e:
        raise PrepareError(path, None, f"cannot write ({e.strerror or e})", "check permissions and free disk space") from None
    return n


# --- command line ----------------------------------------------------------------------------

def _test_size(value: str) -> float:
    try:
        size = float(value)
    except ValueError:
        size = -1.0
    if not 0 <= size < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fraction in [0, 1)")
    return size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finllm_pl.prepare", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["fpb", "tfns", "fiqa", "generic"], help="format of INPUT")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="output; with --test-size > 0, OUT.train.jsonl and OUT.test.jsonl instead")
    p.add_argument("--test-size", type=_test_size, default=0.25, help="stratified test share (0 = no split)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    g = p.add_argument_group("generic only")
    g.add_argument("--text-column")
    g.add_argument("--label-column")
    g.add_argument("--label-map", help='JSON object from raw label to name, e.g. \'{"0":"negative"}\'')
    g.add_argument("--format", choices=["csv", "jsonl"], help="default: from the extension")
    return p


def _split_paths(out: str) -> tuple[str, str]:
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return f"{stem}.train.jsonl", f"{stem}.test.jsonl"


def _run(args, parser) -> int:
    generic_opts = [args.text_column, args.label_column, args.label_map, args.format]
    if args.kind == "generic":
        if not (args.text_column and args.label_column):
            parser.error("generic needs --text-column and --label-column")
    elif any(o is not None for o in generic_opts):
        parser.error("--text-column/--label-column/--label-map/--format apply to 'generic' only")
    if not args.instruction.strip():
        raise PrepareError("--instruction", None, "empty instruction", "leave it out to use FinGPT's wording")
    # Check the output folder before reading: no point converting 10k rows to then fail.
    folder = Path(args.out).parent
    if not folder.is_dir():
        raise PrepareError(args.out, None, f"output folder {str(folder)!r} does not exist",
                           "create it first (mkdir -p) or choose another --out")

    if args.kind == "generic":
        label_map = None
        if args.label_map is not None:
            try:
                label_map = json.loads(args.label_map)
            except json.JSONDecodeError as e:
                raise PrepareError("--label-map", None, f"not valid JSON ({e.msg})",
                                   """write it like '{"0":"negative","1":"neutral","2":"positive"}'""") from None
            if not isinstance(label_map, dict):
                raise PrepareError("--label-map", None, "not a JSON object", "map raw labels to names")
        reader = read_generic(args.input, args.text_column, args.label_column, label_map, args.format)
    else:
        reader = {"fpb": read_fpb, "tfns": read_tfns, "fiqa": read_fiqa}[args.kind](args.input)
    # Read and check everything first, so bad input never leaves any output behind.
    rows = [to_instruction(r, args.instruction) for r in reader]
    if not rows:
        raise PrepareError(args.input, None, "no rows found", f"is this really a {args.kind} file?")

    if args.test_size > 0:
        train, test = stratified_split(rows, args.test_size, args.seed, key="output")
        if not train or not test:
            raise PrepareError(args.input, None, f"only {len(rows)} rows: one part of the split would be "
                               "empty", "use --test-size 0 or more data")
        parts = list(zip(_split_paths(args.out), (train, test)))
    else:
        parts = [(args.out, rows)]
    for path, part in parts:
        write_jsonl_atomic(part, path)

    print(f"read {len(rows)} rows from {args.input} ({args.kind})")
    for path, part in parts:
        counts = Counter(r["output"] for r in part)
        print(f"wrote {len(part):>6} rows to {path}: " + ", ".join(f"{lab} {counts[lab]}" for lab in LABELS))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""records.iter_rows for predict's input: ids are line numbers (a user joins the output back on them), input fields
carried through (data.keep_fields), and the errors that name file:line and the field."""

import json

import pytest

from finllm_pl.records import DataError, iter_rows


def _rows(path, keep=(), **kw):
    if keep:
        kw["keep_fields"] = keep
    return list(iter_rows(str(path), "Classify.", need_output=False, **kw))


def test_plain_text_ids_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "in.txt"
    lines = ["Shares rose.", "", "Profit fell.", "   ", "", "Sales were flat."]
    p.write_text("\n".join(lines) + "\n")
    rows = _rows(p)
    assert [r.id for r in rows] == ["1", "3", "6"]
    assert [r.index for r in rows] == [0, 1, 2]  # the output order: data rows only, 0-based
    assert [r.line for r in rows] == [1, 3, 6]
    for r in rows:  # the join a user makes: the id is the line the text came from
        assert lines[int(r.id) - 1] == r.input


def test_jsonl_ids_are_the_rows_own_or_their_line_numbers(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"id": "a7", "text": "x"}\n\n{"text": "y"}\n{"id": 12, "text": "z"}\n')
    rows = _rows(p)
    assert [(r.index, r.line, r.id) for r in rows] == [(0, 1, "a7"), (1, 3, "3"), (2, 4, "12")]


def test_csv_ids_are_the_line_where_each_record_starts(tmp_path):
    # header on line 1, a blank line (skipped by csv), a record whose quoted text spans lines 4-5, then line 6
    p = tmp_path / "in.csv"
    p.write_text('date,text\n2024-01-01,Shares rose.\n\n2024-01-02,"Profit\nfell."\n2024-01-03,Flat.\n')
    rows = _rows(p)
    assert [(r.index, r.id, r.input) for r in rows] == [(0, "2", "Shares rose."), (1, "4", "Profit\nfell."),
                                                        (2, "6", "Flat.")]
    assert [r.line for r in rows] == [2, 4, 6]
    q = tmp_path / "ids.csv"
    q.write_text("id,text\nx1,Shares rose.\n,Profit fell.\n")  # an empty id cell: the line number
    assert [r.id for r in _rows(q)] == ["x1", "3"]


def test_kept_fields_come_with_each_row_as_they_are_in_the_input(tmp_path):
    p = tmp_path / "in.jsonl"
    rows = [{"id": 1, "text": "Shares rose.", "date": "2024-01-01", "ticker": "ABC", "n": 3, "extra": None},
            {"id": 2, "instruction": "Classify.", "input": "Profit fell.", "date": "2024-01-02", "ticker": "XYZ",
             "n": [1, 2], "extra": {"k": "v"}}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _rows(p, keep=["id", "date", "ticker", "n", "extra", "text"])
    # JSON values keep their types (null too); "text" is the input text whatever the schema; "id" is the output id
    assert [r.fields for r in got] == [
        {"date": "2024-01-01", "ticker": "ABC", "n": 3, "extra": None, "text": "Shares rose."},
        {"date": "2024-01-02", "ticker": "XYZ", "n": [1, 2], "extra": {"k": "v"}, "text": "Profit fell."}]
    assert [r.id for r in got] == ["1", "2"]
    c = tmp_path / "in.csv"
    c.write_text("date,headline,ticker\n2024-01-01,Shares rose.,ABC\n2024-01-02,Profit fell.,\n")
    got = _rows(c, keep=["ticker", "text", "date"], text_column="headline")
    assert [r.fields for r in got] == [{"ticker": "ABC", "text": "Shares rose.", "date": "2024-01-01"},
                                       {"ticker": "", "text": "Profit fell.", "date": "2024-01-02"}]
    t = tmp_path / "in.txt"
    t.write_text("Shares rose.\n\nProfit fell.\n")
    assert [r.fields for r in _rows(t, keep=["text"])] == [{"text": "Shares rose."}, {"text": "Profit fell."}]
    assert [r.fields for r in _rows(t)] == [{}, {}]  # nothing asked, nothing carried


@pytest.mark.parametrize("name, content, keep, match", [
    ("in.jsonl", '{"text": "a", "ticker": "X"}\n\n{"text": "b"}\n', ["ticker"],
     r'in.jsonl:3: no field "ticker" in this row; data.keep_fields asks for it'),
    ("in.jsonl", '{"id": 1, "text": "a"}\n{"text": "b"}\n', ["id"], r'in.jsonl:2: no field "id" in this row'),
    ("in.csv", "text,date\nShares rose.,2024\n", ["ticker"],
     r"in.csv:1: no column 'ticker' \(columns: text, date\); data.keep_fields asks for it"),
    ("in.csv", "text,date,ticker\nShares rose.,2024,ABC\n\nProfit fell.,2024\n", ["ticker"],
     r"in.csv:4: no value for column 'ticker' \(the row has fewer fields than the header\)"),
    ("in.csv", "id,text\n,Shares rose.\n", ["id"], r"in.csv:2: column 'id' is empty"),
    ("in.txt", "\nShares rose.\n", ["text", "date"],
     r"in.txt:2: plain-text rows have only the field 'text', not 'date'; remove it from data.keep_fields"),
])
def test_a_missing_kept_field_names_the_file_line_and_field(tmp_path, name, content, keep, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        _rows(p, keep=keep)

"""Converters, split and CLI of finllm_pl.prepare, on small invented fixtures (tests/fixtures/)."""

import json
from collections import Counter
from pathlib import Path

import pytest

from finllm_pl.prepare import (
    DEFAULT_INSTRUCTION,
    PrepareError,
    fiqa_label,
    main,
    read_fiqa,
    read_fpb,
    read_generic,
    read_tfns,
    stratified_split,
    to_instruction,
    write_jsonl_atomic,
)

FIX = Path(__file__).parent / "fixtures"


def run_cli(argv):
    """main() returns an exit code; argparse usage errors raise SystemExit instead."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --- converters ---------------------------------------------------------------------------------

def test_fpb_fixture_is_latin1_crlf():
    # Guards the fixture itself: a checkout that rewrites line ends or encodings would make
    # the FPB test below meaningless.
    raw = (FIX / "fpb_sample.txt").read_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert "ä".encode("latin-1") in raw


def test_read_fpb():
    rows = list(read_fpb(FIX / "fpb_sample.txt"))
    assert [r["label"] for r in rows] == ["positive", "negative", "neutral", "neutral", "negative", "positive"]
    assert rows[1]["text"].startswith("Kärkimetalli will cut")  # latin-1 decoded, not mojibake
    assert rows[2]["text"] == "Investors can send questions to ir@lumora.example before the meeting ."
    assert all(r["source"] == "fpb" and not r["text"].endswith(("\r", " ")) for r in rows)


def test_read_tfns():
    rows = list(read_tfns(FIX / "tfns_sample.csv"))
    assert [r["label"] for r in rows] == ["negative", "positive", "neutral", "neutral", "positive"]
    assert rows[1]["text"] == "Brennan Foods beats on revenue, lifts dividend by 8%"
    assert rows[2]["text"] == "$HLMR: Helmer Rail to present at industrials conference\nTuesday 10am ET"
    assert rows[3]["text"] == 'Analysts say "no surprises" expected from Corvel Bank results'
    assert {r["source"] for r in rows} == {"tfns"}


def test_read_fiqa():
    rows = list(read_fiqa(FIX / "fiqa_sample.json"))
    got = {r["id"]: r["label"] for r in rows}
    # 1001 "-0.52" string; 1002 exactly -0.1; 1003 exactly 0.1 (its second info, -0.9, is ignored);
    # 1004 -0.101; 1005 "0.099" string; 1006 "0.32" string.
    assert got == {"1001": "negative", "1002": "neutral", "1003": "positive",
                   "1004": "negative", "1005": "neutral", "1006": "positive"}
    assert rows[0]["text"] == "Tarvo Mining shares plunge as output misses forecasts"
    assert {r["source"] for r in rows} == {"fiqa"}


@pytest.mark.parametrize("score, label", [
    (-1.0, "negative"), (-0.1000001, "negative"), (-0.1, "neutral"), (0.0, "neutral"),
    (0.0999999, "neutral"), (0.1, "positive"), (1.0, "positive"),
])
def test_fiqa_thresholds(score, label):
    assert fiqa_label(score) == label
    assert fiqa_label(float(str(score))) == label  # string scores parse to the same float


def test_read_generic_csv_with_label_map():
    rows = list(read_generic(FIX / "generic_sample.csv", "headline", "score",
                             {"-1": "negative", "0": "neutral", "1": "positive"}))
    assert [r["label"] for r in rows] == ["positive", "neutral", "negative", "neutral"]
    assert rows[0]["text"] == "Lindqvist Tools posts record quarterly profit"
    assert rows[0]["source"] == "generic_sample"


def test_read_generic_jsonl_label_names_and_numeric_map(tmp_path):
    rows = list(read_generic(FIX / "generic_sample.jsonl", "body", "sentiment"))
    assert [r["label"] for r in rows] == ["negative", "positive", "neutral"]  # case-folded, blank line skipped
    p = tmp_path / "nums.jsonl"
    p.write_text('{"t": "a", "y": 0}\n{"t": "b", "y": 2}\n', encoding="utf-8")
    rows = list(read_generic(p, "t", "y", {"0": "negative", "2": "positive"}))
    assert [r["label"] for r in rows] == ["negative", "positive"]  # JSON numbers match string keys


def test_to_instruction():
    row = to_instruction({"text": "X rises", "label": "positive", "source": "fiqa", "id": "7"})
    assert row == {"instruction": DEFAULT_INSTRUCTION, "input": "X rises", "output": "positive",
                   "source": "fiqa", "id": "7"}
    assert DEFAULT_INSTRUCTION == ("What is the sentiment of this news? Please choose an answer from "
                                   "{negative/neutral/positive}.")
    assert "id" not in to_instruction({"text": "t", "label": "neutral", "source": "fpb"}, "Q?")


# --- split --------------------------------------------------------------------------------------

def _rows(n_neg=13, n_neu=40, n_pos=21):
    labels = ["negative"] * n_neg + ["neutral"] * n_neu + ["positive"] * n_pos
    return [{"i": i, "label": lab} for i, lab in enumerate(labels)]


def test_stratified_split_complete_disjoint_ordered_and_proportional():
    rows = _rows()
    train, test = stratified_split(rows, 0.25, seed=42)
    ids_train, ids_test = [r["i"] for r in train], [r["i"] for r in test]
    assert not set(ids_train) & set(ids_test)
    assert sorted(ids_train + ids_test) == list(range(len(rows)))
    assert ids_train == sorted(ids_train) and ids_test == sorted(ids_test)  # original order kept
    total, in_test = Counter(r["label"] for r in rows), Counter(r["label"] for r in test)
    for label, n in total.items():
        assert abs(in_test[label] - n * 0.25) <= 1, label


def test_stratified_split_is_seeded():
    rows = _rows()
    ids = lambda part: [r["i"] for r in part]  # noqa: E731
    a = stratified_split(rows, 0.25, seed=1)[1]
    assert ids(a) == ids(stratified_split(rows, 0.25, seed=1)[1])
    assert ids(a) != ids(stratified_split(rows, 0.25, seed=2)[1])


def test_stratified_split_zero_and_bad_size():
    rows = _rows()
    assert stratified_split(rows, 0, seed=0) == (rows, [])
    with pytest.raises(ValueError):
        stratified_split(rows, 1.0, seed=0)


# --- atomic write -------------------------------------------------------------------------------

def test_write_jsonl_atomic_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out.jsonl"
    assert write_jsonl_atomic([{"a": 1}, {"a": "ä"}], out) == 2
    assert read_jsonl(out) == [{"a": 1}, {"a": "ä"}]

    def boom():
        yield {"a": 3}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(boom(), out)
    assert read_jsonl(out) == [{"a": 1}, {"a": "ä"}]  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left
    with pytest.raises(PrepareError, match="does not exist"):
        write_jsonl_atomic([{"a": 1}], tmp_path / "missing" / "x.jsonl")


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_fpb_split_end_to_end(tmp_path, capsys):
    out = tmp_path / "fpb.jsonl"
    assert run_cli(["fpb", FIX / "fpb_sample.txt", "--out", out, "--test-size", "0.5", "--seed", "3"]) == 0
    train, test = read_jsonl(tmp_path / "fpb.train.jsonl"), read_jsonl(tmp_path / "fpb.test.jsonl")
    assert not out.exists()
    assert len(train) == len(test) == 3
    assert Counter(r["output"] for r in test) == {"negative": 1, "neutral": 1, "positive": 1}
    assert {r["input"] for r in train} | {r["input"] for r in test} == \
        {r["text"] for r in read_fpb(FIX / "fpb_sample.txt")}
    assert all(r["instruction"] == DEFAULT_INSTRUCTION and r["source"] == "fpb" for r in train + test)
    printed = capsys.readouterr().out
    assert "fpb.train.jsonl" in printed and "negative 1, neutral 1, positive 1" in printed


def test_cli_no_split_custom_instruction_generic(tmp_path):
    out = tmp_path / "g.jsonl"
    code = run_cli(["generic", FIX / "generic_sample.csv", "--out", out, "--test-size", "0",
                    "--text-column", "headline", "--label-column", "score", "--instruction", "Mood?",
                    "--label-map", '{"-1": "negative", "0": "neutral", "1": "positive"}'])
    assert code == 0
    rows = read_jsonl(out)
    assert [r["output"] for r in rows] == ["positive", "neutral", "negative", "neutral"]
    assert {r["instruction"] for r in rows} == {"Mood?"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl"]


def test_cli_fiqa_keeps_id(tmp_path):
    assert run_cli(["fiqa", FIX / "fiqa_sample.json", "--out", tmp_path / "f.jsonl", "--test-size", "0"]) == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "f.jsonl")] == ["1001", "1002", "1003", "1004", "1005", "1006"]


# Each case: (kind, file name, bytes, extra args, expected "file:line" suffix or None, text in message).
BAD = {
    "fpb_no_at": ("fpb", "a.txt", b"Good line .@neutral\r\nNo separator here\r\n", [], ":2:", "no '@'"),
    "fpb_bad_label": ("fpb", "a.txt", b"x@neutral\r\n\r\ny@bullish\r\n", [], ":3:", "'bullish'"),
    "fpb_empty_text": ("fpb", "a.txt", b"x@neutral\r\n @positive\r\n", [], ":2:", "empty"),
    "tfns_no_label_col": ("tfns", "a.csv", b"text,sentiment\nx,0\n", [], ":1:", "'label'"),
    "tfns_bad_label": ("tfns", "a.csv", b'text,label\nx,0\n"multi\nline",1\ny,3\n', [], ":5:", "record 3"),
    "tfns_bad_quote": ("tfns", "a.csv", b'text,label\n"never closed,1\n', [], ":2:", "malformed CSV"),
    "tfns_empty_text": ("tfns", "a.csv", b'text,label\n"  ",2\n', [], ":2:", "empty"),
    "fiqa_bad_json": ("fiqa", "a.json", b'{\n "1": {"sentence": "x",\n}', [], ":3:", "not valid JSON"),
    "fiqa_no_sentence": ("fiqa", "a.json",
                         b'{\n"1": {"sentence": "x", "info": [{"sentiment_score": 0.5}]},\n'
                         b'"2": {"info": [{"sentiment_score": 0.5}]}\n}', [], ":3:", "no 'sentence'"),
    "fiqa_no_score": ("fiqa", "a.json", b'{"1": {"sentence": "x", "info": []}}', [], ":1:", "sentiment_score"),
    "fiqa_bad_score": ("fiqa", "a.json", b'{\n"9": {"sentence": "x", "info": [{"sentiment_score": "high"}]}}',
                       [], ":2:", "'high'"),
    "generic_missing_col": ("generic", "a.csv", b"body,y\nx,positive\n", ["--text-column", "text"], ":1:", "'text'"),
    "generic_unmapped": ("generic", "a.jsonl", b'{"text": "x", "y": 0}\n{"text": "z", "y": 5}\n',
                         ["--text-column", "text", "--label-map", '{"0": "neutral"}'], ":2:", "'5'"),
    "generic_unknown_label": ("generic", "a.csv", b"text,y\nx,bullish\n", ["--text-column", "text"], ":2:",
                              "--label-map"),
    "empty_input": ("fpb", "a.txt", b"\r\n\r\n", [], None, "no rows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_one_line_exit_2(case, tmp_path, capsys):
    kind, name, data, extra, where, text = BAD[case]
    src = tmp_path / name
    src.write_bytes(data)
    if kind == "generic":
        extra = extra + ["--label-column", "y"]
    out = tmp_path / "out.jsonl"
    assert run_cli([kind, src, "--out", out, "--test-size", "0.5", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {src}"), err
    assert "Traceback" not in err and text in err and ";" in err, err
    if where is not None:
        assert err.startswith(f"error: {src}{where}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no temp file


def test_cli_missing_input_and_missing_out_folder(tmp_path, capsys):
    assert run_cli(["fpb", tmp_path / "nope.txt", "--out", tmp_path / "o.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.txt: file not found" in err
    out = tmp_path / "no_such_dir" / "o.jsonl"
    assert run_cli(["fpb", FIX / "fpb_sample.txt", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_dir" in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_usage_errors_exit_2(tmp_path):
    out = tmp_path / "o.jsonl"
    assert run_cli(["generic", FIX / "generic_sample.csv", "--out", out]) == 2  # columns missing
    assert run_cli(["fpb", FIX / "fpb_sample.txt", "--out", out, "--text-column", "t"]) == 2
    assert run_cli(["fpb", FIX / "fpb_sample.txt", "--out", out, "--test-size", "1.5"]) == 2
    assert list(tmp_path.iterdir()) == []


# --- bundled sample -----------------------------------------------------------------------------

def test_bundled_sample_is_well_formed_and_reproducible(tmp_path, monkeypatch):
    import importlib.util

    data = Path(__file__).parent.parent / "data"
    rows = read_jsonl(data / "sample.jsonl")
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert {r["instruction"] for r in rows} == {DEFAULT_INSTRUCTION}
    assert Counter(r["output"] for r in rows) == {"negative": 60, "neutral": 120, "positive": 60}
    unlabeled = (data / "sample_unlabeled.txt").read_text(encoding="utf-8").splitlines()
    assert len(unlabeled) == 20 and all(line.strip() for line in unlabeled)
    assert len({r["input"] for r in rows} | set(unlabeled)) == 260  # no repeats, no overlap

    spec = importlib.util.spec_from_file_location("make_sample", data / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    monkeypatch.setattr(make_sample, "HERE", tmp_path)
    make_sample.main()
    for name in ("sample.jsonl", "sample_unlabeled.txt"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes(), name

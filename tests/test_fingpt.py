"""FinGPT's protocol (finllm_pl/fingpt.py): label mapping on hand-written fixtures in the native formats
(tests/fixtures/fingpt/), split sizes and order on synthetic files with the real files' row counts, the CLI,
and evaluate/comparison_table with a fake predictor."""

import csv
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from finllm_pl import fingpt
from finllm_pl.fingpt import (NEWS, PUBLISHED, TWEET, build_splits, comparison_table, evaluate, fiqa_rows, fpb_rows,
                              hf_split, main, nwgi_rows, read_nwgi, tfns_rows)

FIX = Path(__file__).parent / "fixtures" / "fingpt"
FPB, TFNS, NWGI = FIX / "Sentences_50Agree.txt", FIX / "sent_valid.csv", FIX / "test-00000-of-00001.parquet"
FIQA = [FIX / "task1_headline_ABSA_train.json", FIX / "task1_post_ABSA_train.json"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --- the fixtures and the label mapping ---------------------------------------------------------

def test_fixtures_are_native():
    raw = FPB.read_bytes()
    assert raw.count(b"\r\n") == 8 and b"\n" not in raw.replace(b"\r\n", b"") and "ä".encode("latin-1") in raw
    assert '"$HLMR: Helmer Rail schedules Q3 call\nThursday 8am ET",2' in TFNS.read_text()
    # The committed Parquet holds exactly the rows of its readable twin.
    assert pq.read_table(NWGI).to_pylist() == read_jsonl(FIX / "nwgi_test.jsonl")


def test_tfns_mapping_and_wording():
    rows = tfns_rows(TFNS)  # all of the validation file, in file order
    assert [r["output"] for r in rows] == ["negative", "positive", "neutral", "positive", "negative", "neutral"]
    assert rows[2]["input"] == "$HLMR: Helmer Rail schedules Q3 call\nThursday 8am ET"
    assert rows[3]["input"] == 'Analysts call Westmoor Bank results "solid" as loans grow'
    assert {r["instruction"] for r in rows} == {TWEET}
    assert [r["id"] for r in rows] == [f"tfns-{i}" for i in range(6)]


def test_nwgi_collapses_seven_labels_like_fingpt(tmp_path):
    rows = nwgi_rows(NWGI)
    # strong neg, mildly neg, neutral, mildly pos, strong pos, moderately neg, moderately pos
    assert [r["output"] for r in rows] == ["negative", "neutral", "neutral", "neutral", "positive", "negative",
                                           "positive"]
    assert rows[0]["input"].startswith("Shares of Kestrel Software") and {r["instruction"] for r in rows} == {NEWS}
    # A JSONL or CSV export of the same split reads the same.
    expected = [(r["input"], r["output"]) for r in rows]
    assert [(r["text"], r["label"]) for r in read_nwgi(FIX / "nwgi_test.jsonl")] == expected
    with open(tmp_path / "nwgi.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["news", "label"])
        w.writerows((r["news"], r["label"]) for r in read_jsonl(FIX / "nwgi_test.jsonl"))
    assert [(r["text"], r["label"]) for r in read_nwgi(tmp_path / "nwgi.csv")] == expected


def test_fiqa_labels_and_wording_from_the_task1_json():
    rows = fiqa_rows(FIQA)  # 6 entries -> ceil(0.226 * 6) = 2 test rows; look at all 6 through the ids
    assert len(rows) == 2
    every = [r for p in FIQA for r in fingpt._fiqa_json(p)]  # (text, label, format) of all 6, in order
    # -0.61 negative; exactly -0.1 neutral; exactly 0.1 positive (second info ignored); .52 pos; .05 neu; -.43 neg
    assert [label for _, label, _ in every] == ["negative", "neutral", "positive", "positive", "neutral", "negative"]
    assert [fmt for _, _, fmt in every] == ["headline"] * 3 + ["post"] * 3
    for r in rows:
        i = int(r["id"].split("-")[1])
        assert (r["input"], r["output"]) == every[i][:2]
        assert r["instruction"] == (TWEET if i >= 3 else NEWS)  # posts are "tweets" in FinGPT's wording


def test_fpb_test_rows_are_fingpts():
    rows = fpb_rows(FPB)
    lines = FPB.read_bytes().decode("latin-1").split("\r\n")[:-1]
    assert len(rows) == 2  # ceil(0.25 * 8)
    for r in rows:
        sentence, _, label = lines[int(r["id"].split("-")[1])].rpartition("@")
        assert (r["input"], r["output"], r["instruction"]) == (sentence, label, NEWS)


# --- the split: datasets' own, sizes of the real files --------------------------------------------

@pytest.mark.parametrize("n", [2, 7, 1213, 4846])
def test_hf_split_is_datasets_train_test_split(n):
    ds = Dataset.from_dict({"i": list(range(n))})
    fpb_like = ds.train_test_split(seed=42)  # FinGPT's FPB call: test_size left to its default
    train, test = hf_split(n, 0.25)
    assert (fpb_like["train"]["i"], fpb_like["test"]["i"]) == (train, test)
    if n > 4:
        fiqa_like = ds.train_test_split(0.226, seed=42)  # FinGPT's FiQA call
        assert (fiqa_like["train"]["i"], fiqa_like["test"]["i"]) == hf_split(n, 0.226)


def write_fpb(path, n):
    labels = ("negative", "neutral", "positive")
    text = "".join(f"Yhtiö {i} reported item {i * 7} , guidance {i % 5} .@{labels[i % 3]}\r\n" for i in range(n))
    path.write_bytes(text.encode("latin-1"))


def test_sizes_on_files_shaped_like_the_real_ones(tmp_path):
    write_fpb(tmp_path / "Sentences_50Agree.txt", 4846)  # the release's 50%-agree file has 4,846 lines
    with open(tmp_path / "sent_valid.csv", "w", newline="") as f:  # TFNS validation: 2,388 rows
        f.write("text,label\n" + "".join(f'"$T{i} headline {i},\nsecond line",{i % 3}\n' for i in range(2388)))
    # pauri32/fiqa-2018's three CSVs: FinGPT printed 275 test rows, so 1,213-1,216 rows in all; take 1,213.
    for name, lo, hi in (("train", 0, 950), ("validation", 950, 990), ("test", 990, 1213)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            f.write(",sentence,snippets,target,sentiment_score,aspects,format,label\n")
            f.write("".join(f'{i},"Row {i}, about $X",x,X,{(i % 7 - 3) / 10},[],{("post", "headline")[i % 2]},0\n'
                            for i in range(lo, hi)))
    news = [f"Company {i} moved {i % 9}% today." for i in range(4047)]  # NWGI test split: 4,047 rows
    labels = [list(fingpt.NWGI_LABELS)[i % 7] for i in range(4047)]
    pq.write_table(pa.table({"news": news, "label": labels}), tmp_path / "nwgi.parquet")

    paths = build_splits(fpb=tmp_path / "Sentences_50Agree.txt", tfns=tmp_path / "sent_valid.csv",
                         fiqa=[tmp_path / f"{s}.csv" for s in ("train", "validation", "test")],
                         nwgi=tmp_path / "nwgi.parquet", out_dir=tmp_path / "out")
    sizes = {name: len(read_jsonl(p)) for name, p in paths.items()}
    assert sizes == {"fpb": 1212, "fiqa": 275, "tfns": 2388, "nwgi": 4047}  # FinGPT's notebook: the same four

    # FPB's test rows are datasets' train_test_split(seed=42) test rows, in its order.
    lines = (tmp_path / "Sentences_50Agree.txt").read_bytes().decode("latin-1").split("\r\n")[:-1]
    hf = Dataset.from_dict({"sentence": [ln.rpartition("@")[0] for ln in lines]}).train_test_split(seed=42)
    assert [r["input"] for r in read_jsonl(paths["fpb"])] == hf["test"]["sentence"]
    # FiQA: train + validation + test concatenated, then split 0.226; wording by format; thresholds on the score.
    fiqa = read_jsonl(paths["fiqa"])
    assert [int(r["id"][5:]) for r in fiqa] == hf_split(1213, 0.226)[1]
    for r in fiqa:
        i = int(r["id"][5:])
        score = (i % 7 - 3) / 10
        assert r["input"] == f"Row {i}, about $X" and r["instruction"] == (TWEET if i % 2 == 0 else NEWS)
        assert r["output"] == ("negative" if score < -0.1 else "neutral" if score < 0.1 else "positive")
    tfns = read_jsonl(paths["tfns"])
    assert tfns[5]["input"] == "$T5 headline 5,\nsecond line" and tfns[5]["output"] == "neutral"  # 2 = Neutral
    assert Counter(r["output"] for r in read_jsonl(paths["nwgi"])) == \
           Counter(fingpt.NWGI_LABELS[lab] for lab in labels)


def test_fiqa_json_route_keeps_the_size_rule(tmp_path):
    # From the task-1 JSONs: the same ceil(0.226 N) rule (1,173 entries -> 266 rows, not FinGPT's 275).
    for kind, lo, hi in (("headline", 0, 498), ("post", 498, 1173)):
        data = {str(i): {"sentence": f"{kind} {i}", "info": [{"sentiment_score": "0.3"}]} for i in range(lo, hi)}
        (tmp_path / f"task1_{kind}_ABSA_train.json").write_text(json.dumps(data))
    rows = fiqa_rows([tmp_path / "task1_headline_ABSA_train.json", tmp_path / "task1_post_ABSA_train.json"])
    assert len(rows) == math.ceil(0.226 * 1173) == 266
    assert [int(r["id"][5:]) for r in rows] == hf_split(1173, 0.226)[1]


# --- command line ---------------------------------------------------------------------------------

def run_cli(argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def fixture_args(out):
    return ["build", "--fpb", FPB, "--tfns", TFNS, "--fiqa", FIQA[0], "--fiqa", FIQA[1], "--nwgi", NWGI, "--out", out]


def test_cli_build(tmp_path, capsys, monkeypatch):
    first_tfns = tfns_rows(TFNS)[0]["input"]  # pretend FinGPT printed our fixture's first TFNS row
    monkeypatch.setitem(fingpt.FIRST_INPUT_SHA256, "tfns", hashlib.sha256(first_tfns.encode()).hexdigest())
    assert run_cli(fixture_args(tmp_path / "out")) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fiqa.jsonl", "fpb.jsonl", "nwgi.jsonl",
                                                                    "tfns.jsonl"]
    tfns_line = next(line for line in out if line.startswith("tfns"))
    assert "6 rows" in tfns_line and "negative 2, neutral 2, positive 2" in tfns_line and tfns_line.endswith("yes")
    assert next(line for line in out if line.startswith("nwgi")).endswith(
        "negative 2, neutral 3, positive 2; first row = FinGPT's: no")


def test_cli_errors_leave_nothing_behind(tmp_path, capsys):
    bad = tmp_path / "Sentences_50Agree.txt"
    bad.write_bytes(FPB.read_bytes() + b"A line without a label\r\n")
    args = fixture_args(tmp_path / "out")
    args[args.index("--fpb") + 1] = bad
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:9: no '@'") and "\n" not in err
    assert not (tmp_path / "out").exists()  # the other sets were fine, but nothing was written

    odd = tmp_path / "fiqa_extra.json"  # a FiQA file whose name says neither headline nor post
    odd.write_text(FIQA[0].read_text())
    assert run_cli(["build", "--fiqa", odd, "--out", tmp_path / "out"]) == 2
    assert "headlines or posts" in capsys.readouterr().err
    assert run_cli(["build", "--out", tmp_path / "out"]) == 2  # nothing to build: usage error

    bad_nwgi = tmp_path / "nwgi.parquet"
    pq.write_table(pa.table({"news": ["x"], "label": ["very negative"]}), bad_nwgi)
    assert run_cli(["build", "--nwgi", bad_nwgi, "--out", tmp_path / "out"]) == 2
    assert "row 1: label 'very negative'" in capsys.readouterr().err
    assert run_cli(["build", "--nwgi", TFNS, "--out", tmp_path / "out"]) == 2  # a CSV, but not NWGI's
    assert f"error: {TFNS}:1: no 'news' column (header: text, label); NWGI data has" in capsys.readouterr().err
    assert run_cli(["build", "--tfns", tmp_path / "missing.csv", "--out", tmp_path / "out"]) == 2
    assert "missing.csv: file not found; check the path given on the command line" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- evaluate and the table -----------------------------------------------------------------------

def test_evaluate_with_a_fake_predictor_and_the_table(tmp_path):
    splits = build_splits(fpb=FPB, tfns=TFNS, out_dir=tmp_path)
    calls = []

    def fake_predict(inp, out):
        calls.append((inp, out))
        return {"accuracy": 0.5, "f1_macro": 0.25, "f1_weighted": 0.75 if "tfns" in inp else 0.125, "support": 9}

    results = evaluate(splits, fake_predict)
    assert calls == [(str(tmp_path / "fpb.jsonl"), str(tmp_path / "fpb.predictions.jsonl")),
                     (str(tmp_path / "tfns.jsonl"), str(tmp_path / "tfns.predictions.jsonl"))]
    assert results["tfns"] == {"rows": 6, "accuracy": 0.5, "f1_macro": 0.25, "f1_weighted": 0.75,
                               "published_f1_weighted": 0.903,
                               "predictions": str(tmp_path / "tfns.predictions.jsonl")}
    assert results["fpb"]["rows"] == 2
    table = comparison_table({"nwgi": {"rows": 3, "accuracy": 1, "f1_macro": 1, "f1_weighted": 1}, **results})
    lines = table.splitlines()
    assert lines[0] == "| set | rows | accuracy | macro-F1 | weighted-F1 | FinGPT v3.3 weighted-F1 |"
    assert lines[2] == "| fpb | 2 | 0.5000 | 0.2500 | 0.1250 | 0.882 |"  # FinGPT's order: fpb, (fiqa), tfns, nwgi
    assert lines[3] == "| tfns | 6 | 0.5000 | 0.2500 | 0.7500 | 0.903 |"
    assert lines[4] == "| nwgi | 3 | 1.0000 | 1.0000 | 1.0000 | 0.643 |"
    assert "FinGPT v3.3 (Llama2-13B)" in table
    with pytest.raises(ValueError, match="no 'f1_weighted'"):
        evaluate(splits, lambda i, o: {"accuracy": 1.0, "f1_macro": 1.0})


def test_published_numbers():
    assert PUBLISHED == {"fpb": 0.882, "fiqa": 0.874, "tfns": 0.903, "nwgi": 0.643}


def test_the_protocol_in_one_command_labels_every_set_with_the_cli(tmp_path, tiny_dir, capsys):
    """`python -m finllm_pl.fingpt evaluate --config ... --fpb ... --tfns ... --fiqa ... --nwgi ...`: the splits
    built, each labeled by the real predict (label scoring; here the tiny base model), the table printed with
    FinGPT's published numbers beside ours, and results.md / results.json written."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "eval"
    rc = fingpt.main(["evaluate", "--config", str(root / "configs/smoke.yaml"), "--fpb", str(FPB), "--tfns", str(TFNS),
                      "--fiqa", str(FIQA[0]), "--fiqa", str(FIQA[1]), "--nwgi", str(NWGI), "--out", str(out),
                      "--", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    assert rc == 0
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"fpb", "tfns", "fiqa", "nwgi"}
    for name, r in results.items():
        labeled = read_jsonl(Path(r["predictions"]))
        assert len(labeled) == r["rows"] == len(read_jsonl(out / f"{name}.jsonl"))
        assert r["accuracy"] == pytest.approx(sum(x["label"] == x["gold"] for x in labeled) / len(labeled))
        assert f"| {name} | {r['rows']} | {r['accuracy']:.4f} |" in table
    assert "| 0.882 |" in table and (out / "results.md").read_text().count("| fpb |") == 1

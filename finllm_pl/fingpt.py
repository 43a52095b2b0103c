"""FinGPT's sentiment benchmark (FPB, FiQA-SA, TFNS, NWGI), rebuilt from the files a user downloads.

    python -m finllm_pl.fingpt build --fpb Sentences_50Agree.txt --tfns sent_valid.csv \\
        --fiqa task1_headline_ABSA_train.json --fiqa task1_post_ABSA_train.json \\
        --nwgi test-00000-of-00001.parquet --out data/fingpt

Protocol: FinGPT's benchmarks/{fpb,fiqa,tfns,nwgi}.py (github.com/AI4Finance-Foundation/FinGPT, folder
fingpt/FinGPT_Benchmark/benchmarks), the same protocol as AI4Finance-Foundation/FinNLP's finnlp/benchmarks/*.py,
which produced the published numbers (fingpt/FinGPT_Sentiment_Analysis_v3/benchmark/benchmarks_llama2_13b.ipynb
prints the row counts used below). Each test set:

- FPB: HF `financial_phrasebank`/`sentences_50agree` = Sentences_50Agree.txt, one row per line in file order (the
  HF loading script: `for line in f: sentence, label = line.rsplit("@", 1)`); FinGPT takes
  `train_test_split(seed=42)["test"]` (test_size defaults to 0.25): 4,846 rows -> 1,212. Exact.
- TFNS: HF `zeroshot/twitter-financial-news-sentiment` "validation" = sent_valid.csv (2,388 rows), all of it, in
  file order; 0 Bearish -> negative, 1 Bullish -> positive, 2 Neutral -> neutral; "tweet" instruction. Exact.
- FiQA-SA: HF `pauri32/fiqa-2018` (CSVs train/validation/test with columns sentence, sentiment_score, format),
  concatenated train + validation + test, `train_test_split(0.226, seed=42)["test"]`, labels score < -0.1
  negative, < 0.1 neutral, else positive, "tweet" instruction for format "post", "news" otherwise. FinGPT's run
  printed 275 test rows, so that concatenation has 1,213-1,216 rows. pauri32 built its CSVs from FiQA task 1's
  two JSON files by steps it did not publish (repo history: upload the JSONs, a combined fiqa2018.csv, a train/test
  split, then a "balanced few-shots" file renamed validation.csv), so the order (and the extra rows over the
  release's entries) cannot be recovered from the JSONs. Given pauri32's three CSVs (in that order) this
  module is exact; given the task-1 JSONs it does the closest documented thing: every file in the order given
  (headlines then posts), entries in file order, one row per entry (its first info's score), then the same split:
  the same size rule, ceil(0.226 N), but NOT FinGPT's rows (e.g. 1,173 entries, the size of
  TheFinAI/fiqa-sentiment-classification, also built from task 1 (822/117/234), give 266 test rows, not 275).
- NWGI: HF `oliverwang15/news_with_gpt_instructions` split "test" (its data/test-*.parquet, 4,047 rows), all of
  it, in file order, text from `news`; its 7 labels collapse as nwgi.py's `dic` does: strong/moderately negative
  -> negative, strong/moderately positive -> positive, mildly negative/mildly positive/neutral -> neutral. Exact
  from that file (the hub's older single 20,231-row version was split 16,184/4,047 with a seed not published).
  (FinGPT_Benchmark's nwgi.py forgets to select ["test"]; FinNLP's, which gave the numbers, selects it.)

Known small differences: our readers strip surrounding whitespace from the text (HF keeps it), which changes a
prompt only where a line has such whitespace. Output rows: {"instruction", "input", "output", "source", "id"},
test rows in FinGPT's order; id = "<set>-<row number in the source before the split>".
As a check, `build` compares each set's first test row with the one FinGPT's notebook printed (by SHA-256 of the
text; a "no" means the row order differs from FinGPT's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .files import write_atomic
from .prepare import (DEFAULT_INSTRUCTION, LABELS, PrepareError, clean_text, csv_records, jsonl_records, to_float,
                      fiqa_label, read_fiqa, read_fpb, read_tfns, write_jsonl_atomic)

NEWS = DEFAULT_INSTRUCTION  # FinGPT's wording, verbatim (with the final '.')
TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
SETS = ("fpb", "fiqa", "tfns", "nwgi")  # FinGPT's table order
SEED = 42
FPB_TEST_SIZE, FIQA_TEST_SIZE = 0.25, 0.226
NWGI_LABELS = {
    "strong negative": "negative", "moderately negative": "negative", "mildly negative": "neutral",
    "strong positive": "positive", "moderately positive": "positive", "mildly positive": "neutral",
    "neutral": "neutral",
}
# FinGPT v3.3 (Llama2-13B LoRA, 8-bit) weighted F1: FinGPT README.md "Benchmark Results" table and
# fingpt/FinGPT_Sentiment_Analysis_v3/README.md; the notebook's unrounded values are 0.8818, 0.8744, 0.9028, 0.6428.
PUBLISHED = {"fpb": 0.882, "fiqa": 0.874, "tfns": 0.903, "nwgi": 0.643}
PUBLISHED_SOURCE = "FinGPT v3.3 (Llama2-13B), AI4Finance-Foundation/FinGPT README.md benchmark table"
# SHA-256 of the input text of the first test row FinGPT's notebook printed ("Prompt example"), per set.
FIRST_INPUT_SHA256 = {
    "fpb": "410acf6ea3ca26a3cf06c656a697ecede66c209b5a621af86d20bf447cc794f7",
    "fiqa": "4924bc2965bfedfe9ab98c8df3c393716045265d4cd771e74913e35ef1f4832a",
    "tfns": "38c1a832c8faa62661d4a0d3ec1e08f1fd9a9cd5ae8c756e6bf9826555050ba3",
    "nwgi": "fa74d23b61b7ace7435276b663b3c5e419c27fb9b05a097fe594d4e838544408",
}


def hf_split(n: int, test_size: float, seed: int = SEED) -> tuple[list[int], list[int]]:
    """(train, test) row indices as `datasets.Dataset.train_test_split(test_size, seed=seed)` draws them (the same
    code in datasets 2.14, FinGPT's time, and 5.2): n_test = ceil(test_size * n), a numpy default_rng(seed)
    permutation, test = its first n_test entries in that order, train = the rest. It depends on n only: same rows
    in the same order, same split. Written out so the split does not hinge on the installed datasets (a test
    compares the two); the first-row check of `build` would show a change in numpy's permutation stream."""
    if not 0 < test_size < 1 or n < 2:
        raise ValueError(f"need 0 < test_size < 1 and n >= 2, got {test_size}, {n}")
    n_test = math.ceil(test_size * n)
    perm = np.random.default_rng(seed).permutation(n).tolist()
    return perm[n_test:], perm[:n_test]


def _row(instruction: str, text: str, label: str, name: str, i: int) -> dict:
    return {"instruction": instruction, "input": text, "output": label, "source": name, "id": f"{name}-{i}"}


def _test_part(rows: list[dict], test_size: float, path) -> list[dict]:
    if len(rows) < 2:
        raise PrepareError(path, None, f"only {len(rows)} rows, too few to split", "is this the whole file?")
    return [rows[i] for i in hf_split(len(rows), test_size)[1]]


def fpb_rows(path) -> list[dict]:
    """FinGPT's FPB test set from Sentences_50Agree.txt."""
    rows = [_row(NEWS, r["text"], r["label"], "fpb", i) for i, r in enumerate(read_fpb(path))]
    return _test_part(rows, FPB_TEST_SIZE, path)


def tfns_rows(path) -> list[dict]:
    """FinGPT's TFNS test set: all of sent_valid.csv."""
    return [_row(TWEET, r["text"], r["label"], "tfns", i) for i, r in enumerate(read_tfns(path))]


def _fiqa_csv(path) -> Iterator[tuple[str, str, str]]:
    """(text, label, format) from one of pauri32/fiqa-2018's CSVs (columns sentence, sentiment_score, format)."""
    for line, n, rec in csv_records(path, ("sentence", "sentiment_score", "format"),
                                     "pauri32/fiqa-2018 CSVs have sentence, sentiment_score and format columns"):
        score = to_float(rec["sentiment_score"])
        if score is None:
            raise PrepareError(path, line, f"record {n}: sentiment_score {rec['sentiment_score']!r} is not a number",
                               "scores are numbers between -1 and 1")
        yield clean_text(rec["sentence"], path, line, f"record {n}: "), fiqa_label(score), rec["format"].strip()


def _fiqa_json(path) -> Iterator[tuple[str, str, str]]:
    """(text, label, format) from a FiQA task-1 JSON; the format ("headline"/"post") comes from the file name."""
    name = Path(path).name.lower()
    if ("post" in name) == ("headline" in name):
        raise PrepareError(path, None, "cannot tell whether this file holds headlines or posts (FinGPT words the "
                           "instruction by it)", "keep the release's name: task1_headline_ABSA_train.json or "
                           "task1_post_ABSA_train.json")
    fmt = "post" if "post" in name else "headline"
    for r in read_fiqa(path):
        yield r["text"], r["label"], fmt


def fiqa_rows(paths: Sequence) -> list[dict]:
    """FinGPT's FiQA-SA test set from pauri32's CSVs (train, validation, test: exact) or the task-1 JSONs
    (headlines, posts: the closest documented construction, see the module docstring)."""
    if not paths:
        raise ValueError("fiqa_rows needs at least one file")
    rows = []
    for path in paths:
        reader = _fiqa_csv(path) if str(path).lower().endswith(".csv") else _fiqa_json(path)
        for text, label, fmt in reader:
            rows.append(_row(TWEET if fmt == "post" else NEWS, text, label, "fiqa", len(rows)))
    return _test_part(rows, FIQA_TEST_SIZE, paths[0])


def _nwgi_row(path, line: Optional[int], where: str, text, raw) -> dict:
    if not isinstance(raw, str) or raw not in NWGI_LABELS:
        raise PrepareError(path, line, f"{where}: label {raw!r} is not one of NWGI's 7",
                           f"expected one of: {', '.join(NWGI_LABELS)}")
    return {"text": clean_text(text, path, line, f"{where}: "), "label": NWGI_LABELS[raw], "source": "nwgi"}


def read_nwgi(path) -> Iterator[dict]:
    """NWGI rows {"text", "label" (3 classes), "source"} from its native Parquet (the hub's data/test-*.parquet)
    or from a CSV / JSONL export with the same `news` and `label` columns."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        for line, n, rec in csv_records(path, ("news", "label"), "NWGI data has 'news' and 'label' columns"):
            yield _nwgi_row(path, line, f"record {n}", rec["news"], rec["label"].strip())
        return
    if suffix in (".jsonl", ".json"):
        for line, _, rec in jsonl_records(path):
            yield _nwgi_row(path, line, "row", rec.get("news"), rec.get("label"))
        return
    if suffix != ".parquet":
        raise PrepareError(path, None, f"cannot read NWGI from a {suffix or 'extension-less'} file",
                           "give the test split's .parquet (or a .csv / .jsonl with news and label columns)")
    if not Path(path).is_file():
        raise PrepareError(path, None, "file not found", "check the path given on the command line")
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise PrepareError(path, None, f"not a readable Parquet file ({str(e).splitlines()[0]})",
                           "download it again (oliverwang15/news_with_gpt_instructions, data/test-*.parquet)") from None
    missing = [c for c in ("news", "label") if c not in table.column_names]
    if missing:
        raise PrepareError(path, None, f"no {missing[0]!r} column (columns: {', '.join(table.column_names)})",
                           "is this news_with_gpt_instructions?")
    for n, (text, raw) in enumerate(zip(table.column("news").to_pylist(), table.column("label").to_pylist()), 1):
        yield _nwgi_row(path, None, f"row {n}", text, raw)


def nwgi_rows(path) -> list[dict]:
    """FinGPT's NWGI test set: all of the test split."""
    return [_row(NEWS, r["text"], r["label"], "nwgi", i) for i, r in enumerate(read_nwgi(path))]


def matches_fingpt(name: str, rows: list[dict]) -> Optional[bool]:
    """Whether the first test row is the one FinGPT printed (None where we hold no reference)."""
    ref = FIRST_INPUT_SHA256.get(name)
    if ref is None or not rows:
        return None
    return hashlib.sha256(rows[0]["input"].strip().encode("utf-8")).hexdigest() == ref


def build_splits(fpb=None, tfns=None, fiqa=None, nwgi=None, out_dir="data/fingpt") -> dict[str, Path]:
    """Write FinGPT's test set of each given source as out_dir/<set>.jsonl; returns {set: path}. `fiqa` is one
    path or a list. Every file is read and checked before anything is written, and each file is written
    atomically, so bad input leaves no output (PrepareError names file:line)."""
    sets = {}
    if fpb is not None:
        sets["fpb"] = fpb_rows(fpb)
    if fiqa is not None:
        sets["fiqa"] = fiqa_rows([fiqa] if isinstance(fiqa, (str, Path)) else list(fiqa))
    if tfns is not None:
        sets["tfns"] = tfns_rows(tfns)
    if nwgi is not None:
        sets["nwgi"] = nwgi_rows(nwgi)
    if not sets:
        raise ValueError("build_splits needs at least one of fpb, tfns, fiqa, nwgi")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(out, None, f"cannot create the output folder ({e.strerror or e})",
                           "choose another --out") from None
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl_atomic(rows, paths[name])
    return paths


def _count_rows(path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def evaluate(splits: dict, run_predict: Callable[[str, str], dict]) -> dict:
    """Run `run_predict(input_path, output_path) -> metrics` (accuracy, f1_macro, f1_weighted: what
    metrics.summarize reports) on each split; predictions go to <set>.predictions.jsonl beside the split.
    Returns {set: {rows, accuracy, f1_macro, f1_weighted, published_f1_weighted, predictions}} for
    comparison_table."""
    results = {}
    for name, path in splits.items():
        out = Path(path).with_name(f"{Path(path).stem}.predictions.jsonl")
        metrics = run_predict(str(path), str(out))
        missing = [k for k in ("accuracy", "f1_macro", "f1_weighted") if k not in metrics]
        if missing:
            raise ValueError(f"{name}: run_predict returned no {missing[0]!r} (keys: {', '.join(metrics)})")
        results[name] = {"rows": _count_rows(path), **{k: float(metrics[k]) for k in
                                                       ("accuracy", "f1_macro", "f1_weighted")},
                         "published_f1_weighted": PUBLISHED.get(name), "predictions": str(out)}
    return results


def comparison_table(results: dict) -> str:
    """Markdown table of our metrics per set beside FinGPT v3.3's published weighted F1 (FinGPT's sets first)."""
    lines = ["| set | rows | accuracy | macro-F1 | weighted-F1 | FinGPT v3.3 weighted-F1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in sorted(results, key=lambda s: (SETS.index(s) if s in SETS else len(SETS), s)):
        m = results[name]
        rows = m.get("rows", m.get("support", ""))
        pub = PUBLISHED.get(name)
        lines.append(f"| {name} | {rows} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} | {m['f1_weighted']:.4f} | "
                     f"{'-' if pub is None else f'{pub:.3f}'} |")
    return "\n".join(lines) + f"\n\nPublished numbers: {PUBLISHED_SOURCE}.\n"


# --- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finllm_pl.fingpt", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write FinGPT's test sets as JSONL, one file per set")
    b.add_argument("--fpb", metavar="Sentences_50Agree.txt")
    b.add_argument("--tfns", metavar="sent_valid.csv")
    b.add_argument("--fiqa", action="append", metavar="FILE",
                   help="task1_headline_ABSA_train.json then task1_post_ABSA_train.json (closest), or pauri32's "
                        "train.csv, validation.csv, test.csv in that order (exact); repeat the option per file")
    b.add_argument("--nwgi", metavar="test-*.parquet", help="news_with_gpt_instructions' test split")
    b.add_argument("--out", required=True, metavar="DIR")
    e = sub.add_parser("evaluate", help="label FinGPT's test sets with a model (and adapter) and print the table",
                       description="Label each set with `python -m finllm_pl predict` (label scoring) and print "
                                   "accuracy / macro-F1 / weighted-F1 per set beside FinGPT's published numbers. "
                                   "Give the sets' source files (as for build) or --splits (build's output).")
    e.add_argument("--config", required=True, help="a finllm_pl config (the model, its quantization, batch sizes)")
    e.add_argument("--ckpt_path", help="the adapter folder (or .ckpt) to evaluate; none: the base model itself")
    e.add_argument("--splits", metavar="DIR", help="a folder build wrote (fpb.jsonl, tfns.jsonl, ...)")
    for flag, meta in (("--fpb", "Sentences_50Agree.txt"), ("--tfns", "sent_valid.csv"), ("--nwgi", "test-*.parquet")):
        e.add_argument(flag, metavar=meta)
    e.add_argument("--fiqa", action="append", metavar="FILE")
    e.add_argument("--out", default="fingpt_eval", metavar="DIR", help="splits, predictions and results.md go here")
    e.add_argument("predict_args", nargs="*", help="more options for predict, after --, e.g. -- --data.eval_batch_size 64")
    return p


def _run_predict(config: str, ckpt: Optional[str], extra: list[str]) -> Callable[[str, str], dict]:
    """predict in this process; the metrics it writes beside the output (the splits carry their gold labels)."""
    def run(inp: str, out: str) -> dict:
        from .__main__ import cli_main

        args = ["predict", "--config", config, "--data.predict_path", inp, "--data.predict_output", out,
                "--data.overwrite", "true", *(["--ckpt_path", ckpt] if ckpt else []), *extra]
        cli_main(args)
        return json.loads(Path(f"{out.removesuffix('.jsonl')}.metrics.json").read_text())
    return run


def _evaluate_command(args) -> int:
    if args.splits:
        splits = {name: Path(args.splits) / f"{name}.jsonl" for name in SETS if (Path(args.splits) / f"{name}.jsonl").exists()}
        if not splits:
            print(f"error: {args.splits}: no fpb/tfns/fiqa/nwgi .jsonl in it; run `build` first", file=sys.stderr)
            return 2
    else:
        if not any((args.fpb, args.tfns, args.fiqa, args.nwgi)):
            print("error: give --splits DIR or at least one of --fpb, --tfns, --fiqa, --nwgi", file=sys.stderr)
            return 2
        try:
            splits = build_splits(fpb=args.fpb, tfns=args.tfns, fiqa=args.fiqa, nwgi=args.nwgi, out_dir=args.out)
        except PrepareError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    results = evaluate(splits, _run_predict(args.config, args.ckpt_path, list(args.predict_args)))
    table = comparison_table(results)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.out) / "results.md", f"# FinGPT's sentiment protocol: {args.ckpt_path or 'the base model'}"
                 f"\n\n{table}")
    write_atomic(Path(args.out) / "results.json", json.dumps(results, indent=2) + "\n")
    print(table)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        return _evaluate_command(args)
    if not any((args.fpb, args.tfns, args.fiqa, args.nwgi)):
        parser.error("give at least one of --fpb, --tfns, --fiqa, --nwgi")
    try:
        paths = build_splits(fpb=args.fpb, tfns=args.tfns, fiqa=args.fiqa, nwgi=args.nwgi, out_dir=args.out)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        counts = Counter(r["output"] for r in rows)
        same = {True: "yes", False: "no", None: "?"}[matches_fingpt(name, rows)]
        print(f"{name:<5} {len(rows):>6} rows -> {path}: " + ", ".join(f"{lab} {counts[lab]}" for lab in LABELS)
              + f"; first row = FinGPT's: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""predict through the CLI on the tiny model: input formats, order and ids, base model, metrics, generation, export."""

import csv
import json
import shutil
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from finllm_pl.__main__ import cli_main, main
from finllm_pl.predict import PredictionWriter, parse_generated, part_path, prediction_report

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jsonl"
INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def _rows(n=23):
    with open(SAMPLE) as f:
        return [json.loads(line) for line in f][:n]


def _predict(inp, out, *extra, ckpt=None):
    args = ["predict", "--config", str(ROOT / "configs/smoke.yaml"), "--data.predict_path", str(inp),
            "--data.predict_output", str(out), "--data.predict_chunk_rows", "7", "--data.eval_batch_size", "3",
            *QUIET, *extra]
    if ckpt:
        args += ["--ckpt_path", str(ckpt)]
    cli_main(args)
    with open(out) as f:
        return [json.loads(line) for line in f]


def _write_inputs(tmp: Path, rows: list[dict]) -> dict[str, tuple[Path, list[str], bool]]:
    """The same texts in every input format: {name: (path, expected ids in order, has gold)}. A row's own id is
    its id, else its 1-based line number (CSV: after the header line)."""
    n = len(rows)
    ids = [f"r{i:03d}" for i in range(n)][::-1]  # ids not in sorted order: the output must keep input order
    files = {}
    p = tmp / "train_schema.jsonl"
    p.write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in zip(ids, rows)))
    files["jsonl-train-schema"] = (p, ids, True)
    p = tmp / "text_rows.jsonl"
    p.write_text("".join(json.dumps({"text": r["input"]}) + "\n" for r in rows))
    files["jsonl-text"] = (p, [str(i + 1) for i in range(n)], False)
    p = tmp / "news.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "headline", "label"])
        w.writerows([["2024-01-01", r["input"], r["output"]] for r in rows])
    files["csv"] = (p, [str(i + 2) for i in range(n)], True)
    p = tmp / "lines.txt"
    p.write_text("".join(r["input"].replace("\n", " ") + "\n" for r in rows))
    files["txt"] = (p, [str(i + 1) for i in range(n)], False)
    return files


def test_every_input_format_gives_the_same_labels_in_input_order(tmp_path, trained):
    _, adapter, _ = trained
    rows = _rows()
    outs = {}
    for name, (path, ids, has_gold) in _write_inputs(tmp_path, rows).items():
        extra = ["--data.text_column", "headline"] if name == "csv" else []
        out = _predict(path, tmp_path / f"{name}.out.jsonl", *extra, ckpt=adapter)
        assert [r["id"] for r in out] == ids, name
        for r, src in zip(out, rows):
            assert r["label"] in ("negative", "neutral", "positive")
            assert abs(sum(r["probs"].values()) - 1) < 1e-4 and r["label"] == max(r["probs"], key=r["probs"].get)
            assert (r.get("gold") == src["output"]) if has_gold else "gold" not in r
        outs[name] = out
        # no part or progress file left behind; the job record stays (it says which input the output belongs to)
        assert [p.name for p in tmp_path.glob(f"{name}.out.jsonl.*")] == [f"{name}.out.jsonl.job.json"]
    # Same texts, same prompts: every format must give the same probabilities row by row.
    ref = outs["jsonl-train-schema"]
    for name, out in outs.items():
        for a, b in zip(ref, out):
            for lab in a["probs"]:
                assert abs(a["probs"][lab] - b["probs"][lab]) < 1e-5, (name, a, b)


def test_base_model_predicts_without_an_adapter_and_the_adapter_changes_it(tmp_path, trained):
    _, adapter, _ = trained
    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(10)))
    base = _predict(inp, tmp_path / "base.jsonl")
    tuned = _predict(inp, tmp_path / "tuned.jsonl", ckpt=adapter)
    assert len(base) == len(tuned) == 10
    diff = max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(base, tuned) for k in a["probs"])
    assert diff > 1e-3, "the adapter made no difference: was it loaded?"


def test_predict_on_labelled_input_writes_metrics_that_match_the_rows(tmp_path, trained, capsys):
    _, adapter, _ = trained
    inp = tmp_path / "gold.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _rows(40)))
    out = _predict(inp, tmp_path / "gold.labels.jsonl", ckpt=adapter)
    report = json.loads((tmp_path / "gold.labels.metrics.json").read_text())
    labels = ["negative", "neutral", "positive"]
    correct = sum(r["label"] == r["gold"] for r in out)
    assert report["rows"] == report["support"] == 40 and report["unparsed"] == 0
    assert report["accuracy"] == pytest.approx(correct / 40)
    cm = [[sum(r["gold"] == g and r["label"] == p for r in out) for p in labels] for g in labels]
    assert report["confusion_matrix"] == cm
    assert (tmp_path / "gold.labels.metrics.md").exists()
    assert (tmp_path / "gold.labels.metrics_confusion.png").stat().st_size > 1000
    assert "weighted-F1" in capsys.readouterr().err


def test_prediction_report_against_hand_computed_values(tmp_path):
    # gold:  neg neg neg neu neu pos pos pos pos  + one row without gold, one with a gold outside the labels
    # pred:  neg neg neu neu None pos pos neg pos (None = an unparsed generated answer: counted wrong)
    gold = ["negative"] * 3 + ["neutral"] * 2 + ["positive"] * 4
    pred = ["negative", "negative", "neutral", "neutral", None, "positive", "positive", "negative", "positive"]
    rows = [{"id": str(i), "label": p, "gold": g} for i, (g, p) in enumerate(zip(gold, pred))]
    rows += [{"id": "x", "label": "neutral"}, {"id": "y", "label": "neutral", "gold": "mixed"}]
    out = tmp_path / "o.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = prediction_report(str(out), ["negative", "neutral", "positive"])
    assert (rep["rows"], rep["unparsed"], rep["without_gold"], rep["gold_outside_labels"]) == (11, 1, 1, 1)
    assert rep["accuracy"] == pytest.approx(6 / 9)
    # negative: tp 2, fp 1 (a positive), fn 1 -> P 2/3, R 2/3, F1 2/3
    # neutral:  tp 1, fp 1 (a negative), fn 1 (unparsed) -> P 1/2, R 1/2, F1 1/2
    # positive: tp 3, fp 0, fn 1 -> P 1, R 3/4, F1 6/7
    f1 = {"negative": 2 / 3, "neutral": 1 / 2, "positive": 6 / 7}
    for lab, want in f1.items():
        assert rep["per_class"][lab]["f1"] == pytest.approx(want, abs=1e-6), lab
    assert rep["per_class"]["neutral"]["recall"] == pytest.approx(0.5)
    assert rep["f1_macro"] == pytest.approx(sum(f1.values()) / 3, abs=1e-6)
    assert rep["f1_weighted"] == pytest.approx((3 * f1["negative"] + 2 * f1["neutral"] + 4 * f1["positive"]) / 9,
                                               abs=1e-6)
    assert rep["confusion_matrix"][1] == [0, 1, 0, 1]  # neutral row: one right, one unparsed


def test_parse_generated_never_guesses():
    labels = ["negative", "neutral", "positive"]
    assert parse_generated("Positive.", labels) == "positive"
    assert parse_generated("<think>could be negative, or positive</think>\nneutral", labels) == "neutral"
    assert parse_generated("<think>negative... still thinking", labels) is None  # never closed: no answer
    assert parse_generated("I cannot tell", labels) is None
    assert parse_generated("negative or positive", labels) is None
    assert parse_generated("non-negative", labels) == "negative"  # word boundary at '-': documented limitation


def test_generate_mode_writes_free_text_and_counts_unparsed(tmp_path, trained, capsys):
    _, adapter, _ = trained
    inp = tmp_path / "gold.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _rows(9)))
    out = _predict(inp, tmp_path / "gen.jsonl", "--model.predict_mode", "generate", "--model.max_new_tokens", "3",
                   ckpt=adapter)
    assert [r["id"] for r in out] == [str(i + 1) for i in range(9)]  # (line numbers: the rows have no id)
    for r in out:
        assert "generated" in r and "probs" not in r
        assert r["label"] == parse_generated(r["generated"], ["negative", "neutral", "positive"])
    unparsed = sum(r["label"] is None for r in out)
    report = json.loads((tmp_path / "gen.metrics.json").read_text())
    assert report["unparsed"] == unparsed
    # The adapter was trained to answer with one label word and stop: greedy decoding should mostly do that.
    assert unparsed < 9, [r["generated"] for r in out]


def test_export_adapter_from_checkpoint_equals_fit_export(tmp_path, trained):
    from safetensors.torch import load_file

    _, adapter, last = trained
    with pytest.raises(SystemExit) as e:
        main(["export", str(last), "--out", str(tmp_path / "from_ckpt")])
    assert e.value.code == 0
    a = load_file(str(adapter / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "from_ckpt" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa = json.loads((adapter / "prompt_format.json").read_text())
    fb = json.loads((tmp_path / "from_ckpt" / "prompt_format.json").read_text())
    assert fa == fb and fa["quantization"] == "nf4"


def test_merged_model_labels_like_the_adapter_and_loads_without_peft(tmp_path, trained):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, adapter, _ = trained
    merged = tmp_path / "merged"
    with pytest.raises(SystemExit) as e:
        main(["export", str(adapter), "--out", str(merged), "--merged", "--dtype", "float32"])
    assert e.value.code == 0
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())
    assert isinstance(AutoModelForCausalLM.from_pretrained(str(merged)), torch.nn.Module)

    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(12)))
    with_adapter = _predict(inp, tmp_path / "a.jsonl", ckpt=adapter)
    # The merged weights are the NF4 base as training saw it (dequantized) + the LoRA update, so plain fp32 loading
    # must give the adapter-on-NF4 scores.
    folded = _predict(inp, tmp_path / "m.jsonl", "--model.quantization", "none", ckpt=merged)
    diff = max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(with_adapter, folded) for k in a["probs"])
    assert diff < 1e-4, diff
    assert [a["label"] for a in with_adapter] == [b["label"] for b in folded]

    original = tmp_path / "merged_original"
    with pytest.raises(SystemExit):
        main(["export", str(adapter), "--out", str(original), "--merged", "--dtype", "float32",
              "--merge-into", "original"])
    from safetensors.torch import load_file

    w_trained, w_orig = load_file(str(merged / "model.safetensors")), load_file(str(original / "model.safetensors"))
    key = next(k for k in w_trained if k.endswith("q_proj.weight"))
    assert not torch.equal(w_trained[key], w_orig[key]), "--merge-into original must fold into unquantized weights"


def test_export_rejects_what_it_cannot_use(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _export_rc([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "not an adapter" in capsys.readouterr().err
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    assert _export_rc([str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _export_rc(args):
    with pytest.raises(SystemExit) as e:
        main(["export", *args])
    return e.value.code


def test_prefix_reuse_changes_nothing_but_speed(tmp_path, trained):
    _, adapter, _ = trained
    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(12)))
    fast = _predict(inp, tmp_path / "fast.jsonl", ckpt=adapter)
    plain = _predict(inp, tmp_path / "plain.jsonl", "--model.fast_skip", "[prefix_reuse]", ckpt=adapter)
    assert [r["label"] for r in fast] == [r["label"] for r in plain]
    assert max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(fast, plain) for k in a["probs"]) < 1e-5


def test_token_budget_batches_label_like_row_batches(tmp_path, trained):
    _, adapter, _ = trained
    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(12)))
    rows = _predict(inp, tmp_path / "rows.jsonl", ckpt=adapter)
    budget = _predict(inp, tmp_path / "budget.jsonl", "--data.eval_batch_size", "8", "--data.eval_batch_tokens",
                      "150", ckpt=adapter)
    assert [r["id"] for r in budget] == [r["id"] for r in rows] and [r["label"] for r in budget] == [r["label"] for r in rows]
    assert max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(rows, budget) for k in a["probs"]) < 1e-5
    # the stream read and tokenized by worker processes taking turns by chunk: the same rows, once each, in
    # input order (chunks of 2 rows, 3 workers: chunks finish out of order, the writer puts them back in order)
    worker = _predict(inp, tmp_path / "worker.jsonl", "--data.eval_batch_size", "8", "--data.eval_batch_tokens",
                      "150", "--data.num_workers", "2", ckpt=adapter)
    assert worker == budget
    workers = _predict(inp, tmp_path / "workers.jsonl", "--data.eval_batch_size", "1", "--data.predict_chunk_rows",
                       "2", "--data.num_workers", "3", ckpt=adapter)
    assert [r["id"] for r in workers] == [r["id"] for r in rows] and [r["label"] for r in workers] == [r["label"] for r in rows]


def test_predict_workers_read_while_the_model_loads_and_the_loop_takes_their_iterator(tmp_path, trained,
                                                                                     monkeypatch):
    """With workers, setup forks them (Lightning runs it before configure_model, which loads the model): they are
    reading when the model loads, the loop labels from that iterator (no second fork), and the labels are those
    of a run without workers."""
    from torch.utils.data import DataLoader

    from finllm_pl.module import FinLLM

    _, adapter, _ = trained
    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(12)))
    seen, iterators = [], []
    configure_model = FinLLM.configure_model

    def configure(self):
        stream = self.trainer.datamodule._started_stream
        started = getattr(stream, "started", None)
        seen.append([w.is_alive() for w in started._workers] if started is not None else None)
        configure_model(self)

    get_iterator = DataLoader._get_iterator
    monkeypatch.setattr(FinLLM, "configure_model", configure)
    monkeypatch.setattr(DataLoader, "_get_iterator", lambda self: iterators.append(1) or get_iterator(self))
    workers = _predict(inp, tmp_path / "workers.jsonl", "--data.num_workers", "2", ckpt=adapter)
    assert seen == [[True, True]] and len(iterators) == 1
    plain = _predict(inp, tmp_path / "plain.jsonl", ckpt=adapter)
    assert seen[1] is None and workers == plain  # (no workers: nothing to start early)


def test_a_started_stream_stops_its_workers_at_teardown(tmp_path):
    from finllm_pl.data import InstructionDataModule

    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(12)))
    dm = InstructionDataModule(predict_path=str(inp), predict_output=str(tmp_path / "out.jsonl"), num_workers=2,
                               instruction=INSTRUCTION)
    dm.setup("predict")
    workers = dm._started_stream.started._workers
    assert all(w.is_alive() for w in workers)
    dm.teardown("predict")
    for w in workers:
        w.join(timeout=30)
    assert dm._started_stream is None and not any(w.is_alive() for w in workers)


def test_writer_keeps_input_order_when_chunks_finish_out_of_order(tmp_path, capsys):
    """Workers finish chunks in any order; the part file and its recorded progress only ever hold a prefix of the
    rank's chunks, in input order (a resume continues from the recorded chunk count)."""
    labels = ["negative", "neutral", "positive"]
    out = tmp_path / "out.jsonl"
    expect = {"version": 1, "input": "x", "labels": labels, "world": 1, "chunk_rows": 2, "prompt": "p"}
    writer = PredictionWriter(str(out), labels, expect)
    # a stream made 50 s ago (workers started while the model loaded) whose first batch took 5 s from the loop's
    # request: the wait reported is the loop's
    stream = types.SimpleNamespace(created=time.perf_counter() - 50.0, asked=time.perf_counter() - 5.0)
    trainer = types.SimpleNamespace(global_rank=0, world_size=1, strategy=types.SimpleNamespace(barrier=lambda: None),
                                    predict_dataloaders=types.SimpleNamespace(dataset=stream))
    writer.on_predict_start(trainer, None)
    part, progress = part_path(str(out), 0), Path(f"{part_path(str(out), 0)}.json")

    def batch(chunk, size, indices):  # (each batch is written when the next one arrives: one in flight)
        scores = torch.tensor([[0.0, float(i), 1.0] for i in indices])
        writer.write_on_batch_end(trainer, None, {"rows": [(i, f"r{i}", None) for i in indices], "scores": scores},
                                  None, {"chunk": (chunk, size)}, 0)

    batch(1, 2, [2, 3])  # chunk 1 whole (another worker), before chunk 0
    batch(0, 2, [1])
    batch(0, 2, [0])     # chunk 1's rows are in, chunk 0 not yet: nothing may be written
    assert part.read_bytes() == b"" and not progress.exists()
    batch(2, 1, [4])     # chunk 0 completes: chunks 0 and 1 go out, in order
    assert [json.loads(line)["id"] for line in part.read_text().splitlines()] == ["r0", "r1", "r2", "r3"]
    assert json.loads(progress.read_text())["chunks"] == 2
    writer.on_predict_end(trainer, None)
    assert 5.0 <= writer.speed["first_batch_s"] < 50
    assert "after 5." in capsys.readouterr().err  # the wait before labeling is reported, apart from the rate
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    # argmax of [0, i, 1]; row 1's tie goes to the first, as torch.argmax's
    assert [r["label"] for r in rows] == ["positive", "neutral", "neutral", "neutral", "neutral"]
    assert rows[2]["probs"] == {k: round(float(v), 6) for k, v in zip(labels, torch.softmax(torch.tensor([0.0, 2, 1]), -1))}


def test_merge_for_labeling_labels_like_the_adapter(tmp_path, trained, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    merges = []
    merge = BaseTuner.merge_adapter
    monkeypatch.setattr(BaseTuner, "merge_adapter", lambda self, *a, **k: (merges.append(1), merge(self, *a, **k))[1])
    _, adapter, _ = trained
    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(12)))
    plain = _predict(inp, tmp_path / "plain.jsonl", ckpt=adapter)
    assert not merges
    merged = _predict(inp, tmp_path / "merged.jsonl", "--model.merge_for_labeling", "true", ckpt=adapter)
    assert len(merges) == 1  # folded in once, and it is what labeled
    assert [r["label"] for r in merged] == [r["label"] for r in plain]
    diff = max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(plain, merged) for k in a["probs"])
    assert diff < 1e-4  # fp32 here: folding B @ A into the weights changes rounding only
    untuned = _predict(inp, tmp_path / "base.jsonl", "--model.merge_for_labeling", "true")  # no adapter to fold in
    assert max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(plain, untuned) for k in a["probs"]) > 1e-3


def test_a_kill_after_the_output_is_in_place_does_not_relabel(tmp_path, trained, monkeypatch, capsys):
    """Killed between putting the output in place and removing the progress files: the same command labels
    nothing again (the model is never called), leaves the output byte for byte, and cleans up. An output that
    no longer matches the recorded progress is labeled again."""
    from finllm_pl import predict as P
    from finllm_pl.backend import FastBackend

    _, adapter, _ = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _rows(16)))
    out = tmp_path / "in.labels.jsonl"
    real = P.finish_output

    def killed_after_replace(output, world, chunk_rows, job=None, finisher=None):  # the output lands, then "dies"
        saved = {q: q.read_bytes() for q in Path(output).parent.glob("*.part*.json")}
        real(output, world, chunk_rows, job, finisher)
        for q, data in saved.items():
            q.write_bytes(data)

    monkeypatch.setattr(P, "finish_output", killed_after_replace)
    first = _predict(inp, out, ckpt=adapter)
    assert len(first) == 16 and list(tmp_path.glob("*.part0.json"))
    done = out.read_bytes()

    monkeypatch.setattr(P, "finish_output", real)
    monkeypatch.setattr(FastBackend, "score", lambda self, batch: (_ for _ in ()).throw(AssertionError("relabeled")))
    capsys.readouterr()
    assert _predict(inp, out, ckpt=adapter) == first
    assert out.read_bytes() == done and not list(tmp_path.glob("*.part*"))
    assert "labeled 16 rows" in capsys.readouterr().err

    # the same leftover state, but the output was changed since: not a finished job, so it is labeled again
    monkeypatch.undo()  # the real scoring again
    monkeypatch.setattr(P, "finish_output", killed_after_replace)
    out.unlink()  # (else the job is done: this run would label nothing and leave no progress files)
    _predict(inp, out, ckpt=adapter)
    out.write_bytes(done[:-10])
    monkeypatch.setattr(P, "finish_output", real)
    assert _predict(inp, out, ckpt=adapter) == first and not list(tmp_path.glob("*.part*"))


def test_replacing_an_export_never_leaves_the_folder_missing(tmp_path, monkeypatch):
    """The new folder takes the old one's place in one atomic exchange: even if the process dies right after
    (here: the old folder cannot be removed and os.replace is unusable), the target holds the new content."""
    from finllm_pl import files

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "w").write_text("old")
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with files.atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new" and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_the_fast_backend_labels_like_the_plain_one(tmp_path, trained, monkeypatch):
    """predict on the fast backend (label tree, prefix reuse, fused linears and kernels, the base dequantized)
    writes the plain backend's labels and probabilities, and really runs the fused norms."""
    _, adapter, _ = trained
    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(12)))
    plain = _predict(inp, tmp_path / "plain.jsonl", "--model.backend", "plain", ckpt=adapter)
    calls = []
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: (calls.append(1), rms_norm(*a, **k))[1])
    fast = _predict(inp, tmp_path / "fast.jsonl", ckpt=adapter)
    assert calls and len(fast) == len(plain) == 12
    for a, b in zip(plain, fast):
        assert a["id"] == b["id"] and a["label"] == b["label"]
        assert max(abs(a["probs"][k] - b["probs"][k]) for k in a["probs"]) < 1e-5


def test_predict_workers_hand_the_gil_over_sooner(tmp_path, monkeypatch):
    """predict's DataLoader workers run with a GIL switch interval shorter than Python's default
    (data.prompt_worker_init), so a batch a worker has made reaches the main process while the worker tokenizes
    its next chunk."""
    import sys

    from finllm_pl import data

    src = tmp_path / "in.txt"
    src.write_text("up\ndown\n")
    dm = data.InstructionDataModule(train_path=None, predict_path=str(src), predict_output=str(tmp_path / "o.jsonl"),
                                    num_workers=2)
    dm.setup("predict")
    loader = dm.predict_dataloader()
    assert loader.worker_init_fn is data.prompt_worker_init
    before = sys.getswitchinterval()
    try:
        loader.worker_init_fn(0)
        assert sys.getswitchinterval() == pytest.approx(data.PROMPT_WORKER_SWITCH_S)
        assert data.PROMPT_WORKER_SWITCH_S < before
    finally:
        sys.setswitchinterval(before)


def test_the_self_check_draws_its_batches_on_the_host_under_any_default_device(tiny_dir):
    """Lightning's configure_model runs under the GPU as default device; the self-check's made-up batches are
    drawn from a CPU generator all the same (else: 'Expected a cuda device type for generator')."""
    from finllm_pl.backend.selfcheck import RunShape, batches, stand_in_config

    shape = RunShape(str(tiny_dir), "none", torch.float32, torch.device("cpu"), 4, 8, ["q_proj"], "sdpa", False,
                     128, True)
    with torch.device("meta"):  # (a default device other than the CPU: what the GPU's would be)
        train, val = batches(stand_in_config(str(tiny_dir), False), shape, torch.device("cpu"))
    assert train["g_ids"].device.type == val["prompt_ids"].device.type == "cpu"
    assert val["label_ids"].shape[0] == 3 and len(val["prefix_ids"]) >= 8


# -- issue 26: what the outputs carry, where they go, and when they may be replaced ------------------------------
def test_kept_input_fields_come_through_to_every_output_row(tmp_path, trained):
    """data.keep_fields copies input fields into each output row, as they are in the input; ids are line numbers
    (blank lines count), so every output row joins back to its input line."""
    _, adapter, _ = trained
    rows = _rows(6)
    src = tmp_path / "news.jsonl"
    recs = [{"id": f"n{i}", "text": r["input"], "date": f"2024-01-0{i + 1}", "ticker": ["ABC", None, 7][i % 3]}
            for i, r in enumerate(rows)]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = _predict(src, tmp_path / "news.out.jsonl", "--data.keep_fields", "[id, date, ticker, text]", ckpt=adapter)
    assert [r["id"] for r in out] == [r["id"] for r in recs]
    assert [{k: r[k] for k in ("date", "ticker", "text")} for r in out] == \
        [{"date": r["date"], "ticker": r["ticker"], "text": r["text"]} for r in recs]
    assert all(r["label"] in ("negative", "neutral", "positive") for r in out)
    # read and tokenized by worker processes (the fields travel with their batches), chunks of 2 rows: the same rows
    workers = _predict(src, tmp_path / "news.workers.jsonl", "--data.keep_fields", "[id, date, ticker, text]",
                       "--data.num_workers", "2", "--data.predict_chunk_rows", "2", ckpt=adapter)
    numbers = ("probs", "confidence", "margin")  # (batched differently: equal to float rounding, checked apart)
    assert [{k: v for k, v in r.items() if k not in numbers} for r in workers] == \
        [{k: v for k, v in r.items() if k not in numbers} for r in out]
    assert max(abs(a["probs"][k] - b["probs"][k]) for a, b in zip(workers, out) for k in a["probs"]) < 1e-5

    csv_src = tmp_path / "news.csv"
    with open(csv_src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "headline", "ticker"])
        w.writerows([[f"2024-02-0{i + 1}", r["input"], f"T{i}"] for i, r in enumerate(rows)])
    out = _predict(csv_src, tmp_path / "csv.out.jsonl", "--data.text_column", "headline", "--data.keep_fields",
                   "[ticker, date]", ckpt=adapter)
    assert [(r["id"], r["ticker"], r["date"]) for r in out] == [(str(i + 2), f"T{i}", f"2024-02-0{i + 1}")
                                                                for i in range(6)]

    txt = tmp_path / "lines.txt"
    lines = ["", rows[0]["input"], "", "", rows[1]["input"], rows[2]["input"], "  "]
    txt.write_text("\n".join(lines) + "\n")
    out = _predict(txt, tmp_path / "txt.out.jsonl", "--data.keep_fields", "[text]", ckpt=adapter)
    assert [r["id"] for r in out] == ["2", "5", "6"]
    assert all(lines[int(r["id"]) - 1] == r["text"] for r in out)  # the user's join
    plain = _predict(txt, tmp_path / "txt.plain.jsonl", ckpt=adapter)  # nothing asked: no extra keys
    assert [set(r) for r in plain] == [{"id", "label", "probs", "confidence", "margin"}] * 3


def _cli_predict(inp, *extra, ckpt=None):
    """predict with the output left to its default (predictions/ in the working folder) unless extra sets it."""
    args = ["predict", "--config", str(ROOT / "configs/smoke.yaml"), "--data.predict_path", str(inp),
            "--data.predict_chunk_rows", "7", "--data.eval_batch_size", "3", *QUIET, *extra]
    cli_main(args + (["--ckpt_path", str(ckpt)] if ckpt else []))


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _no_model(monkeypatch):
    """Any labeling from here on fails the test: the model must not even be loaded."""
    from finllm_pl.module import FinLLM

    monkeypatch.setattr(FinLLM, "configure_model",
                        lambda self: (_ for _ in ()).throw(AssertionError("the model was loaded: relabeled")))


def _err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_default_outputs_keep_the_input_extension_so_they_never_collide(tmp_path, monkeypatch):
    """my.txt and my.csv get predictions/my.txt.labels.jsonl and predictions/my.csv.labels.jsonl, each with a job
    record (<output>.job.json) naming the input it belongs to."""
    from finllm_pl.predict import input_fingerprint

    monkeypatch.chdir(tmp_path)
    rows = _rows(7)
    (tmp_path / "my.txt").write_text("".join(r["input"] + "\n" for r in rows[:3]))
    with open(tmp_path / "my.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([[r["input"], r["output"]] for r in rows[3:]])
    _cli_predict("my.txt")
    _cli_predict("my.csv")
    txt, csv_out = tmp_path / "predictions/my.txt.labels.jsonl", tmp_path / "predictions/my.csv.labels.jsonl"
    assert [r["id"] for r in _read(txt)] == ["1", "2", "3"] and "gold" not in _read(txt)[0]
    assert [(r["id"], r["gold"]) for r in _read(csv_out)] == [(str(i + 2), r["output"]) for i, r in enumerate(rows[3:])]
    assert (tmp_path / "predictions/my.csv.labels.metrics.json").exists()
    for out, name in ((txt, "my.txt"), (csv_out, "my.csv")):
        job = json.loads(Path(f"{out}.job.json").read_text())
        assert job["input_path"] == str((tmp_path / name).resolve())
        assert job["input"] == input_fingerprint(name) and job["labels"] == ["negative", "neutral", "positive"]
        assert job["prompt"] and job["model"] and job["keep_fields"] == []
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == [
        "my.csv.labels.jsonl", "my.csv.labels.jsonl.job.json", "my.csv.labels.metrics.json",
        "my.csv.labels.metrics.md", "my.csv.labels.metrics_confusion.png", "my.txt.labels.jsonl",
        "my.txt.labels.jsonl.job.json"]


def test_rerunning_a_finished_job_says_it_is_done_and_touches_nothing(tmp_path, trained, monkeypatch, capsys):
    _, adapter, _ = trained
    inp = tmp_path / "gold.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _rows(9)))
    out = tmp_path / "gold.out.jsonl"
    _predict(inp, out, ckpt=adapter)
    written = sorted(tmp_path.glob("gold.out.*"))
    assert len(written) == 5  # output, job record, metrics json / md / png
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in written}
    capsys.readouterr()
    _no_model(monkeypatch)
    _predict(inp, out, ckpt=adapter)  # returns normally: exit status 0
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"{out}: already labeled (9 rows of {inp}") and \
        "nothing to do" in lines[0], lines
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(tmp_path.glob("gold.out.*"))} == before


def test_an_output_of_another_input_is_refused_unless_overwrite_is_set(tmp_path, trained, monkeypatch, capsys):
    _, adapter, _ = trained
    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    a.write_text("".join(json.dumps(r) + "\n" for r in _rows(5)))
    b.write_text("".join(r["input"] + "\n" for r in _rows(8)[5:]))
    out = tmp_path / "out.jsonl"
    _predict(a, out, ckpt=adapter)
    assert (tmp_path / "out.metrics.json").exists()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _predict(b, out, ckpt=adapter)
    assert e.value.code == 2
    err = [line for line in _err_lines(capsys) if "Traceback" in line or line.startswith("error:")]
    assert err == [f"error: {out}: holds the labels of {a}, not of {b}; set data.predict_output to another file, "
                   "or data.overwrite true to replace it"], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced
    rows = _predict(b, out, "--data.overwrite", "true", ckpt=adapter)
    assert [r["id"] for r in rows] == ["1", "2", "3"] and "gold" not in rows[0]
    assert json.loads((tmp_path / "out.jsonl.job.json").read_text())["input_path"] == str(b.resolve())
    # a.jsonl's metrics described a.jsonl's labels: they are gone with them
    assert not list(tmp_path.glob("out.metrics*"))


def test_the_same_input_is_labeled_again_when_its_model_or_its_content_changed(tmp_path, trained, monkeypatch,
                                                                              capsys):
    """Done means: the same input file and content, labels, prompt, kept fields and model (settings, checkpoint
    or adapter files, precision). Another model or an edited input labels again and replaces the output."""
    _, adapter, _ = trained
    inp = tmp_path / "in.txt"
    inp.write_text("".join(r["input"] + "\n" for r in _rows(6)))
    out = tmp_path / "in.out.jsonl"
    base = _predict(inp, out)
    capsys.readouterr()
    tuned = _predict(inp, out, ckpt=adapter)
    assert max(abs(x["probs"][k] - y["probs"][k]) for x, y in zip(base, tuned) for k in x["probs"]) > 1e-3
    assert f"{out}: labeled before with another model or model settings; labeling it again" in capsys.readouterr().err
    kept = _predict(inp, out, "--data.keep_fields", "[text]", ckpt=adapter)  # other fields asked: a new output
    assert [r["text"] for r in kept] == [r["input"] for r in _rows(6)]
    inp.write_text("".join(r["input"] + "\n" for r in _rows(8)))  # the file was edited
    assert len(_predict(inp, out, "--data.keep_fields", "[text]", ckpt=adapter)) == 8
    assert "labeled before with another input content" in capsys.readouterr().err
    _no_model(monkeypatch)
    assert len(_predict(inp, out, "--data.keep_fields", "[text]", ckpt=adapter)) == 8  # and now it is done
    assert "already labeled (8 rows" in capsys.readouterr().err


def test_a_kill_before_the_job_record_is_written_does_not_relabel(tmp_path, trained, monkeypatch, capsys):
    """Killed right after the output was put in place, before its job record was written: the same command
    labels nothing again, writes the record and cleans up; the next run says it is done."""
    from finllm_pl import predict as P

    _, adapter, _ = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _rows(10)))
    out = tmp_path / "in.out.jsonl"

    class Killed(BaseException):
        pass

    monkeypatch.setattr(P, "write_job", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        _predict(inp, out, ckpt=adapter)
    assert out.exists() and not Path(f"{out}.job.json").exists() and list(tmp_path.glob("*.part0.json"))
    first = out.read_bytes()
    monkeypatch.undo()
    from finllm_pl.backend import FastBackend

    monkeypatch.setattr(FastBackend, "score", lambda self, batch: (_ for _ in ()).throw(AssertionError("relabeled")))
    capsys.readouterr()
    _predict(inp, out, ckpt=adapter)  # (the model loads, as after any kill: the data yields nothing to label)
    assert "labeled 10 rows" in capsys.readouterr().err
    assert out.read_bytes() == first and Path(f"{out}.job.json").exists() and not list(tmp_path.glob("*.part*"))
    _no_model(monkeypatch)
    _predict(inp, out, ckpt=adapter)
    assert "already labeled (10 rows" in capsys.readouterr().err


def test_gold_labels_outside_the_label_set_are_counted_in_the_summary_line(tmp_path, trained, capsys):
    """Gold labels that are not in data.labels are left out of the metrics: the summary line says how many and the
    first line, instead of a counter only metrics.json shows."""
    _, adapter, _ = trained
    rows = _rows(20)
    for i in (16, 17, 19):  # lines 17, 18 and 20
        rows[i] = {**rows[i], "output": "bullish"}
    inp = tmp_path / "gold.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    out = _predict(inp, tmp_path / "gold.out.jsonl", ckpt=adapter)
    err = capsys.readouterr().err
    assert "; 3 gold labels are not in negative/neutral/positive (first at line 17): those rows are left out of " \
           "the metrics" in err, err
    assert sum(r["gold"] == "bullish" for r in out) == 3
    assert json.loads((tmp_path / "gold.out.metrics.json").read_text())["support"] == 17

    one = tmp_path / "one.jsonl"  # none in the label set: no metrics at all, and the line says so
    one.write_text("\n" + json.dumps({"text": rows[0]["input"], "label": "bearish"}) + "\n")
    _predict(one, tmp_path / "one.out.jsonl", ckpt=adapter)
    err = capsys.readouterr().err
    assert "; 1 gold label is not in negative/neutral/positive (first at line 2): no metrics are written (set " \
           "data.labels to the file's labels)" in err, err
    assert not list(tmp_path.glob("one.out.metrics*"))


def test_every_file_predict_writes_has_the_modes_a_plain_open_gives(tmp_path, trained):
    """labels, job record, metrics json / md / png (and a merged multi-rank output) get the modes the umask gives
    a plain open(), like any file the user makes: not 0600 from a temp file."""
    import os
    import stat

    from finllm_pl.predict import finish_output

    _, adapter, _ = trained
    old = os.umask(0o002)  # (not the usual 022: a mode hard-coded to 0644 would not pass either)
    try:
        plain = tmp_path / "plain"
        open(plain, "w").close()
        want = stat.S_IMODE(plain.stat().st_mode)
        inp = tmp_path / "gold.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in _rows(6)))
        _predict(inp, tmp_path / "gold.out.jsonl", ckpt=adapter)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("gold.out*")}
        assert set(modes) == {"gold.out.jsonl", "gold.out.jsonl.job.json", "gold.out.metrics.json",
                              "gold.out.metrics.md", "gold.out.metrics_confusion.png"}
        merged = tmp_path / "merged.jsonl"  # two ranks' parts merged into the output
        for r in range(2):
            part_path(str(merged), r).write_text(f'{{"id": "{r}"}}\n')
            Path(f"{part_path(str(merged), r)}.json").write_text("{}")
        finish_output(str(merged), 2, 1, {"input_path": None})
        modes.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("merged.jsonl*")})
        assert len(modes) == 7 and modes == dict.fromkeys(modes, want), \
            (oct(want), {k: oct(v) for k, v in modes.items()})
    finally:
        os.umask(old)


def test_the_readme_names_the_files_predict_writes():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Output layout"):]
    assert "predictions/<input file>.labels.jsonl " in layout
    assert "predictions/<input file>.labels.jsonl.job.json" in layout
    assert "predictions/<input file>.labels.metrics.{json,md}" in layout
    assert "predictions/<input file>.labels.metrics_confusion.png" in layout
    assert ".metrics.{json,md,png}" not in readme  # (the image is .metrics_confusion.png)


# -- issue 27: probabilities users can act on: calibration, a review queue, label-shift adaptation -------------------
def _adapter_with(adapter: Path, tmp: Path, **calibration) -> Path:
    """A copy of the adapter folder with a calibration.json of the given fields."""
    from finllm_pl.calibration import Calibration

    copy = tmp / f"adapter_{len(list(tmp.glob('adapter_*')))}"
    shutil.copytree(adapter, copy)
    Calibration(**calibration).save(copy)
    return copy


def test_rows_carry_confidence_and_margin_and_the_adapter_s_calibration_is_applied(tmp_path, trained):
    """Every row: confidence = its top probability, margin = top minus second. With a calibration.json (T = 2)
    beside the adapter, predict's probabilities are softmax(scores / 2): the uncalibrated log-probabilities halved
    and renormalised; model.use_calibration false ignores it."""
    _, adapter, _ = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": r["input"], "label": r["output"]}) + "\n" for r in _rows(12)))
    hot = _adapter_with(adapter, tmp_path, temperature=2.0, labels=["negative", "neutral", "positive"])
    raw = _predict(inp, tmp_path / "raw.jsonl", ckpt=adapter)
    off = _predict(inp, tmp_path / "off.jsonl", "--model.use_calibration", "false", ckpt=hot)
    cal = _predict(inp, tmp_path / "cal.jsonl", ckpt=hot)
    labels = ["negative", "neutral", "positive"]
    for r, o, c in zip(raw, off, cal):
        p = sorted(r["probs"].values(), reverse=True)
        assert r["confidence"] == pytest.approx(p[0], abs=1e-6) and r["margin"] == pytest.approx(p[0] - p[1], abs=2e-6)
        assert o["probs"] == r["probs"]
        want = torch.softmax(torch.log(torch.tensor([r["probs"][k] for k in labels], dtype=torch.float64)) / 2, -1)
        assert [c["probs"][k] for k in labels] == pytest.approx(want.tolist(), abs=2e-5)
        assert c["label"] == r["label"]  # (a temperature never moves the label)
    assert any(c["confidence"] < r["confidence"] - 1e-3 for r, c in zip(raw, cal))  # it did flatten


def test_the_review_file_holds_exactly_the_rows_under_the_threshold(tmp_path, trained, capsys):
    _, adapter, _ = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": r["input"], "label": r["output"]}) + "\n" for r in _rows(23)))
    out = tmp_path / "out.jsonl"
    rows = _predict(inp, out, ckpt=adapter)
    threshold = sorted(r["confidence"] for r in rows)[len(rows) // 2]  # about half of the rows under it
    out.unlink()
    for p in tmp_path.glob("out.jsonl.*"):
        p.unlink()
    capsys.readouterr()
    rows = _predict(inp, out, "--data.review_below", str(threshold), ckpt=adapter)
    review = [json.loads(line) for line in open(f"{out}.review.jsonl")]
    assert review == [r for r in rows if r["confidence"] < threshold] and 0 < len(review) < len(rows)
    expected = sum(r["confidence"] for r in review) / len(review)
    assert (f"{len(review)} rows under confidence {threshold:g} -> {out}.review.jsonl (expected accuracy "
            f"{expected:.2f} there") in capsys.readouterr().err
    # the same output again without a threshold: no review file beside it (not a stale one)
    _predict(inp, out, "--data.overwrite", "true", ckpt=adapter)
    assert not Path(f"{out}.review.jsonl").exists()


def test_label_shift_reweights_to_the_file_s_own_label_mix(tmp_path, trained, capsys):
    """model.prior_shift em: the rows' probabilities re-weighted to the prior EM estimates from the file (the
    model's own kept as probs_model), the summary names both priors; a given prior re-weights to it; without a
    calibration.json (no prior to start from) it refuses with one line before labeling."""
    from finllm_pl.prior_shift import adjust_to_prior, em_prior

    _, adapter, _ = trained
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": r["input"]}) + "\n" for r in _rows(23)))
    labels = ["negative", "neutral", "positive"]
    train = [0.2, 0.5, 0.3]
    cal = _adapter_with(adapter, tmp_path, temperature=1.0, labels=labels, prior=train)
    plain = _predict(inp, tmp_path / "plain.jsonl", ckpt=cal)
    capsys.readouterr()
    shifted = _predict(inp, tmp_path / "em.jsonl", "--model.prior_shift", "em", ckpt=cal)
    probs = torch.tensor([[r["probs"][k] for k in labels] for r in plain], dtype=torch.float64)
    prior, want, _ = em_prior(probs / probs.sum(-1, keepdim=True), torch.tensor(train, dtype=torch.float64))
    for r, s, w in zip(plain, shifted, want.tolist()):
        assert s["probs_model"] == r["probs"]
        assert [s["probs"][k] for k in labels] == pytest.approx(w, abs=2e-6)
        assert s["label"] == labels[max(range(3), key=w.__getitem__)]
    err = capsys.readouterr().err
    assert "label shift (estimated by EM): prior " + "/".join(f"{x:.2f}" for x in prior.tolist()) in err
    given = _predict(inp, tmp_path / "given.jsonl", "--model.prior_shift", "[0.6, 0.2, 0.2]", ckpt=cal)
    want = adjust_to_prior(probs / probs.sum(-1, keepdim=True), torch.tensor(train), torch.tensor([0.6, 0.2, 0.2]))
    got = torch.tensor([[g["probs"][k] for k in labels] for g in given], dtype=torch.float64)
    assert (got - want).abs().max() < 2e-6
    with pytest.raises(SystemExit):
        _predict(inp, tmp_path / "none.jsonl", "--model.prior_shift", "em", ckpt=adapter)
    assert "model.prior_shift" in capsys.readouterr().err

"""predict's job records, without a model: which job an output belongs to (plan_output), what makes the model's
identity (model_identity), the kept-field names (check_keep_fields) and the output path checks."""

import json
import os
from pathlib import Path

import pytest

from finllm_pl.errors import ConfigError, DataError
from finllm_pl.predict import (check_keep_fields, check_output_path, finished_earlier, input_fingerprint, job_path,
                               model_identity, part_path, plan_output, write_job)


def _job(inp: Path, **change):
    expect = {"version": 4, "input": input_fingerprint(str(inp)), "labels": ["negative", "neutral", "positive"],
              "world": 1, "chunk_rows": 4096, "prompt": "p1", "keep_fields": [], "model": "m1"}
    return {**expect, **change}


def _finished(tmp_path, inp: Path, expect: dict, rows=3) -> Path:
    out = tmp_path / "out.jsonl"
    out.write_text("".join(f'{{"id": "{i + 1}", "label": "neutral"}}\n' for i in range(rows)))
    write_job(str(out), {"input_path": os.path.realpath(inp), **expect})
    return out


@pytest.fixture
def inp(tmp_path):
    p = tmp_path / "news.txt"
    p.write_text("Shares rose.\nProfit fell.\nSales were flat.\n")
    return p


def test_nothing_there_or_nothing_recorded(tmp_path, inp):
    assert plan_output(str(tmp_path / "out.jsonl"), _job(inp), str(inp), False) == ("label", None)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("{}\n")
    with pytest.raises(DataError, match=r"mine.jsonl: exists and was not written by predict \(no .*mine.jsonl.job"):
        plan_output(str(mine), _job(inp), str(inp), False)
    action, note = plan_output(str(mine), _job(inp), str(inp), True)
    assert action == "label" and "replacing the labels of a file predict did not write (data.overwrite)" in note


def test_the_same_job_is_done_whatever_its_ranks_and_chunks(tmp_path, inp):
    out = _finished(tmp_path, inp, _job(inp))
    for change in ({}, {"world": 2}, {"chunk_rows": 7}):  # how the job was split changes nothing it wrote
        action, line = plan_output(str(out), _job(inp, **change), str(inp), False)
        assert action == "done" and line.startswith(f"{out}: already labeled (3 rows of {inp},"), line


@pytest.mark.parametrize("change, what", [
    ({"model": "m2"}, "model or model settings"), ({"labels": ["bad", "good"]}, "label set"),
    ({"prompt": "p2"}, "prompt format"), ({"keep_fields": ["text"]}, "data.keep_fields"),
    ({"version": 5}, "output format version"),
])
def test_the_same_input_with_another_setting_is_labeled_again(tmp_path, inp, change, what):
    out = _finished(tmp_path, inp, _job(inp))
    assert plan_output(str(out), _job(inp, **change), str(inp), False) == \
        ("label", f"{out}: labeled before with another {what}; labeling it again (the new labels replace it when done)")


def test_an_edited_input_or_output_is_labeled_again(tmp_path, inp):
    out = _finished(tmp_path, inp, _job(inp))
    inp.write_text("Shares rose.\n")
    action, note = plan_output(str(out), _job(inp), str(inp), False)  # (the fingerprint is taken anew)
    assert action == "label" and "another input content" in note
    out = _finished(tmp_path, inp, _job(inp))
    with open(out, "a") as f:
        f.write('{"id": "9", "label": "positive"}\n')
    assert plan_output(str(out), _job(inp), str(inp), False) == \
        ("label", f"{out}: changed since it was labeled; labeling it again")


def test_another_inputs_output_is_refused_unless_overwrite(tmp_path, inp):
    other = tmp_path / "other.csv"
    other.write_text("text\nSomething else.\n")
    out = _finished(tmp_path, other, _job(other))
    with pytest.raises(DataError) as e:
        plan_output(str(out), _job(inp), str(inp), False)
    assert str(e.value) == (f"{out}: holds the labels of {other}, not of {inp}; set data.predict_output to another "
                            "file, or data.overwrite true to replace it")
    assert plan_output(str(out), _job(inp), str(inp), True) == \
        ("label", f"{out}: replacing the labels of {other} (data.overwrite)")
    copy = tmp_path / "copy.txt"  # the same content under another name is the same input
    copy.write_bytes(inp.read_bytes())
    out = _finished(tmp_path, copy, _job(copy))
    assert plan_output(str(out), _job(inp), str(inp), False)[0] == "label"


def test_a_finished_output_whose_progress_files_remain_is_completed_not_judged(tmp_path, inp):
    """Killed after the output was in place (its progress records say so): whatever the job record says, the
    writer completes it (finished_earlier), so no refusal and no 'done'."""
    other = tmp_path / "other.txt"
    other.write_text("x\n")
    out = _finished(tmp_path, other, _job(other))  # a stale record of another input
    Path(f"{part_path(str(out), 0)}.json").write_text(json.dumps({**_job(inp), "bytes": out.stat().st_size}))
    assert plan_output(str(out), _job(inp), str(inp), False) == ("label", None)


def _interrupted(out: Path, expect: dict, rows: list[int]) -> None:
    """What a run of `expect` killed midway leaves: each rank's part file and its progress record."""
    for r, n in enumerate(rows):
        part_path(str(out), r).write_text("{}\n" * n)
        Path(f"{part_path(str(out), r)}.json").write_text(json.dumps({**expect, "chunks": 1, "bytes": 3 * n,
                                                                      "rows": n}))


@pytest.mark.parametrize("was, now, words", [
    ({"world": 2}, {}, ("2 processes", "1 process")),
    ({}, {"world": 2}, ("1 process", "2 processes")),
    ({"chunk_rows": 256}, {}, ("data.predict_chunk_rows 256", "data.predict_chunk_rows 4096")),
    ({"world": 2, "chunk_rows": 256}, {"world": 4}, ("2 processes and data.predict_chunk_rows 256",
                                                      "4 processes and data.predict_chunk_rows 4096")),
])
def test_an_interrupted_job_split_otherwise_is_refused_with_what_to_do(tmp_path, inp, was, now, words):
    """Rank r holds chunks r, r + world, ... whose sizes follow from the world size and chunk_rows: a run split
    otherwise cannot continue them, and would throw them away if it started over: one line says what to do."""
    out = tmp_path / "out.jsonl"
    _interrupted(out, _job(inp, **was), [256] * _job(inp, **was)["world"])
    old, new = words
    with pytest.raises(DataError) as e:
        plan_output(str(out), _job(inp, **now), str(inp), False)
    rows = 256 * _job(inp, **was)["world"]
    assert str(e.value) == (f"{out}: an interrupted run of this job labeled {rows} rows with {old}, this run has {new}; "
                            "a job resumes only as it was split over processes and chunks: run it again with "
                            f"{old} to resume it, or delete {out}.part* to label it from the start")
    assert plan_output(str(out), _job(inp, **was), str(inp), False) == ("label", None)  # split as it was: resumed
    # another job's progress (another model) holds nothing of this one: its ranks start over
    assert plan_output(str(out), _job(inp, model="m2", **now), str(inp), False) == ("label", None)


def test_a_finished_job_with_progress_files_left_is_done_whatever_the_split(tmp_path, inp):
    """Killed after the output was in place and its job recorded, before the progress files went: the same job
    on another number of processes finds it finished (no refusal: nothing is left to resume)."""
    out = _finished(tmp_path, inp, _job(inp, world=2))
    first = len(out.read_text().splitlines(keepends=True)[0])  # rank 0's chunk: the first row; rank 1's: the rest
    for r, size in enumerate((first, out.stat().st_size - first)):
        Path(f"{part_path(str(out), r)}.json").write_text(json.dumps({**_job(inp, world=2), "bytes": size}))
    assert finished_earlier(str(out), _job(inp)) == 2  # (its 2 ranks' progress files are what is left to remove)
    assert plan_output(str(out), _job(inp), str(inp), False) == ("label", None)  # the writer completes it
    Path(f"{part_path(str(out), 1)}.json").unlink()  # (the run's cleanup got halfway)
    assert finished_earlier(str(out), _job(inp)) is None
    action, line = plan_output(str(out), _job(inp), str(inp), False)
    assert action == "done", line


def test_model_identity_follows_settings_weights_and_precision(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "README.md").write_text("notes")
    hp = {"model_name_or_path": "builtin:tiny-deepseek", "adapter_path": str(adapter), "lora_r": 4}
    base = model_identity(hp, None, "32-true")
    assert model_identity(dict(hp), None, "32-true") == base  # deterministic
    assert model_identity({**hp, "lora_r": 8}, None, "32-true") != base
    assert model_identity(hp, None, "bf16-mixed") != base
    (adapter / "README.md").write_text("other notes")  # not weights: no change
    assert model_identity(hp, None, "32-true") == base
    (adapter / "adapter_model.safetensors").write_bytes(b"v" * 100)  # the same path, retrained weights
    assert model_identity(hp, None, "32-true") != base
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"c" * 10)
    first = model_identity(hp, str(ckpt), "32-true")
    ckpt.write_bytes(b"d" * 10)
    assert model_identity(hp, str(ckpt), "32-true") != first


def test_keep_fields_names():
    assert check_keep_fields(None) == [] and check_keep_fields(["id", "date", "text"]) == ["id", "date", "text"]
    for bad, match in ((["date", "date"], "'date' is listed twice"), (["probs"], "'probs' is a key predict writes"),
                       (["gold"], "'gold' is a key predict writes"), (["generated"], "'generated' is a key")):
        with pytest.raises(ConfigError, match=match):
            check_keep_fields(bad)


def test_output_path_checks_leave_nothing_behind(tmp_path):
    check_output_path(str(tmp_path / "out.jsonl"))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    with pytest.raises(DataError, match="is a folder"):
        check_output_path(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="f is a file, not a folder"):
        check_output_path(str(tmp_path / "f" / "out.jsonl"), probe=False)
    assert job_path("a/out.jsonl") == Path("a/out.jsonl.job.json")

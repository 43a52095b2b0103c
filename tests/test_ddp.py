"""DDP on CPU: 2 gloo processes on the tiny model vs 1 process, plus the sharding and merge logic in isolation.

The 2-process runs go through the real command line (`python -m finllm_pl ... --trainer.devices 2
--trainer.strategy ddp`: Lightning's launcher starts rank 1 by re-running the command) in a subprocess with its
own process group, killed on timeout, so a DDP deadlock fails the test instead of hanging the suite. The
1-process references run in this process (cheaper: no second interpreter start).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import types
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from finllm_pl.__main__ import cli_main
from finllm_pl.batching import collate_eval
from finllm_pl.data import CountedRows, EvalBatchSampler, LengthGroupedBatchSampler
from finllm_pl import predict
from finllm_pl.predict import PredictStream, chunk_size, finish_output, part_path
from finllm_pl.prompts import PromptFormatter

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a 2-process run takes ~15-25 s on 2 CPU cores; far beyond that it is stuck

# Exactly comparable runs. The sampler builds one global list of batches from (seed, epoch, batch_size) alone,
# whatever the world size, and rank r takes global batches r, r+W, r+2W, ... So 2 ranks x micro-batch 8 with
# accumulation 1 train optimizer step k on global batches {2k, 2k+1}: the same rows, in the same batches (same
# padding), as 1 rank x micro-batch 8 with accumulation 2. The loss of a window is sum(token losses) / tokens over
# those two batches either way, and DDP's averaged gradient is rescaled to the same d(mean token loss).
# LoRA dropout is off: each rank seeds its own dropout stream (seed + rank), so with dropout the two runs would
# draw different masks and only agree "within noise"; without it, they differ only by float rounding.
# 8 global batches of 8 rows = 4 optimizer steps (limit_train_batches counts batches per rank).
STEPS = 4
FIT = ["--config", "configs/smoke.yaml", "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
       "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", "--data.batch_size", "8",
       "--model.lora_dropout", "0", "--model.warmup_steps", "2", "--checkpoint.every_n_train_steps", "2"]
TWO = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def losses_to(path: str) -> list[str]:
    return ["--trainer.callbacks+=" + json.dumps({"class_path": "ddp_probe.StepLosses", "init_args": {"path": path}})]


PREDICT = ["--config", "configs/smoke.yaml", "--trainer.enable_progress_bar", "false", "--data.predict_path",
           "data/sample.jsonl", "--data.predict_chunk_rows", "50", "--data.eval_batch_size", "16"]
VALIDATE = ["--config", "configs/smoke.yaml", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def run_cli(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m finllm_pl ARGS` in cwd: (exit code, stdout+stderr). Every process it started dies with it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                        "LOCAL_WORLD_SIZE", "GROUP_RANK", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT on timeout prints every rank's Python stack
    env.update(env_extra or {})
    p = subprocess.Popen([sys.executable, "-m", "finllm_pl", *args], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGABRT)
        try:
            out, _ = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        pytest.fail(f"`finllm_pl {' '.join(args[:1])}` on 2 processes still running after {TIMEOUT_S}s (DDP "
                    f"deadlock?); killed. Output tail:\n{out[-12000:]}")
    finally:
        try:  # rank 1 (started by Lightning's launcher) must not outlive a rank 0 that died
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out


@contextmanager
def _inside(d: Path):
    """The 1-process references run in-process, in the test folder (contextlib.chdir needs Python 3.11)."""
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def _ok(rc_out):
    rc, out = rc_out
    assert rc == 0, f"exit {rc}:\n{out[-4000:]}"
    return out


def step_log(path: Path) -> dict[int, dict[str, float]]:
    """{optimizer step: {loss, grad_norm, lr}} as ddp_probe.StepLosses recorded them."""
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def adapter_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_dir):
    """One 2-process fit (the outputs several tests read) and its 1-process reference, in a temp folder."""
    d = tmp_path_factory.mktemp("ddp")
    shutil.copytree(ROOT / "data", d / "data")
    shutil.copytree(ROOT / "configs", d / "configs")
    saves = d / "saves.log"
    fit2 = run_cli(["fit", *FIT, *TWO, "--model.accumulate_grad_batches", "1", "--trainer.limit_train_batches",
                    str(STEPS), "--checkpoint.dirpath", "ck2", "--trainer.default_root_dir", "run2",
                    "--trainer.logger", "false", *losses_to("losses2.json"), "--trainer.plugins",
                    json.dumps({"class_path": "ddp_probe.RecordingCheckpointIO"})],
                   d, {"FINLLM_TEST_SAVES": str(saves)})
    with _inside(d):
        cli = cli_main([*FIT, "--model.accumulate_grad_batches", "2", "--trainer.limit_train_batches",
                        str(2 * STEPS), "--checkpoint.dirpath", "ck1", "--trainer.default_root_dir", "run1",
                        "--trainer.logger", "false", *losses_to("losses1.json")], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
    return {"dir": d, "fit2": fit2, "saves": saves}


# -- (i) fit ---------------------------------------------------------------------------------------------------
def test_two_process_fit_matches_one_process_at_the_same_effective_batch(ddp):
    d = ddp["dir"]
    _ok(ddp["fit2"])
    one, two = step_log(d / "losses1.json"), step_log(d / "losses2.json")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1)), (one, two)
    # The 1-process run takes the fast backend's static step, the 2-process one the eager step (DDP rules the static
    # step out): the same math in another order, so they agree up to float32 rounding (measured: losses within
    # 7e-8 relative, adapters within 7e-6; on one backend both ways, bit-identical: DDP's (g0 + g1) / 2 rescaled
    # by 2 / tokens equals the locally accumulated (g0 + g1) / tokens exactly, scaling by 2 being exact). Real faults
    # are far bigger: ranks taking contiguous blocks of batches instead moves the step-1 loss by 4e-3 relative,
    # and a gradient scale wrong for the world size (hidden from the loss by clipping and Adam) halves grad_norm.
    for step in one:
        for k in ("loss", "grad_norm", "lr"):
            assert two[step][k] == pytest.approx(one[step][k], rel=1e-5), f"step {step} {k}: {two[step]} vs {one[step]}"
    assert one[STEPS]["loss"] < one[1]["loss"] - 0.5  # it did train: equal losses are not equally frozen weights

    a, b = adapter_tensors(d / "ck1/last.ckpt"), adapter_tensors(d / "ck2/last.ckpt")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_process_fit_saves_once_from_rank_0_and_exports_the_adapter(ddp):
    d = ddp["dir"]
    _ok(ddp["fit2"])
    saves = [line.split() for line in ddp["saves"].read_text().splitlines()]
    # every_n_train_steps 2 over 4 steps: two saves, each writing its step file and refreshing last.ckpt, once,
    # by rank 0 (one process): rank 1 writes nothing.
    assert [name for _, _, name in saves] == ["step=000002.ckpt", "last.ckpt", "step=000004.ckpt", "last.ckpt"], saves
    assert {rank for rank, _, _ in saves} == {"0"}, saves
    assert len({pid for _, pid, _ in saves}) == 1
    assert sorted(p.name for p in (d / "ck2").iterdir()) == ["adapter", "last.ckpt", "step=000002.ckpt",
                                                              "step=000004.ckpt"]
    ckpt = torch.load(d / "ck2/last.ckpt", weights_only=True)
    assert ckpt["finllm"]["world_size"] == 2 and ckpt["global_step"] == STEPS

    from safetensors.torch import load_file

    exported = load_file(d / "ck2/adapter/adapter_model.safetensors")
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    # PEFT drops the adapter name from the saved keys (lora_A.default.weight -> lora_A.weight).
    assert {k.replace(".default", "") for k in trained} == set(exported)
    for k, v in trained.items():
        assert torch.equal(exported[k.replace(".default", "")], v), k
    assert (d / "ck2/adapter/prompt_format.json").exists()


# -- (iii) validate ------------------------------------------------------------------------------------------
def _one(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def _report(path: Path) -> dict:
    r = json.loads(path.read_text())
    return {k: r[k] for k in ("accuracy", "f1_macro", "f1_weighted", "val_loss", "support", "confusion_matrix",
                              "per_class", "ece", "brier")}


def _same_metrics(got: dict, want: dict) -> None:
    # Same rows in the same batches on both sides: the label scores are identical, so every count-based metric
    # must be equal exactly; val_loss differs only by the order of the float64 sum over ranks (and float32
    # kernels' threading): 1e-6 relative.
    assert got["support"] == want["support"] == 48
    assert got["confusion_matrix"] == want["confusion_matrix"]
    for k in ("accuracy", "f1_macro", "f1_weighted"):
        assert got[k] == want[k], k
    assert got["per_class"] == want["per_class"]
    for k in ("ece", "brier"):  # of every rank's rows, gathered: the one-process numbers
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)


def test_validate_on_two_processes_gives_the_one_process_metrics(ddp):
    d = ddp["dir"]
    _ok(ddp["fit2"])
    # The val set (48 rows, batches of 16 -> 3 batches) does not divide over 2 ranks: rank 1 runs a padding copy
    # of batch 0 to keep the ranks in step, which must count nowhere.
    _ok(run_cli(["validate", *VALIDATE, *TWO, "--trainer.default_root_dir", "val2", "--ckpt_path", "ck2/last.ckpt"], d))
    with _inside(d):
        cli_main(["validate", *VALIDATE, "--trainer.default_root_dir", "val1", "--ckpt_path", "ck2/last.ckpt"])
    # (validate writes to <default_root_dir>/eval/validate-<time>/: README, output layout)
    want = _report(_one(d.glob("val1/eval/validate-*/validation.json")))
    _same_metrics(_report(_one(d.glob("val2/eval/validate-*/validation.json"))), want)
    # fit's own end-of-epoch validation on 2 processes ran on the same (final) weights
    _same_metrics(_report(d / "run2/validation.json"), want)
    # and every rank's callbacks saw the same val/* values (a ModelCheckpoint(monitor=...) decides alike on all)
    seen = [json.loads((d / f"losses2.json.val{r}").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] and set(seen[0]) == {"val/loss", "val/accuracy", "val/f1_macro", "val/f1_weighted",
                                                 "val/ece", "val/brier"}
    assert seen[0]["val/accuracy"] == pytest.approx(want["accuracy"], rel=1e-6)
    assert seen[0]["val/loss"] == pytest.approx(want["val_loss"], rel=1e-6)


# -- (ii) predict ------------------------------------------------------------------------------------------------
def test_predict_on_two_processes_writes_the_one_process_file(ddp):
    d = ddp["dir"]
    _ok(ddp["fit2"])
    # 240 rows in chunks of 50: chunks 0, 2, 4 (the last one 40 rows) on rank 0, chunks 1, 3 on rank 1.
    _ok(run_cli(["predict", *PREDICT, *TWO, "--ckpt_path", "ck2/adapter", "--data.predict_output", "p2.jsonl"], d))
    with _inside(d):
        cli_main(["predict", *PREDICT, "--ckpt_path", "ck2/adapter", "--data.predict_output", "p1.jsonl"])
    one = [json.loads(line) for line in open(d / "p1.jsonl")]
    two = [json.loads(line) for line in open(d / "p2.jsonl")]
    gold = [json.loads(line)["output"] for line in open(d / "data/sample.jsonl")]
    assert len(one) == len(two) == len(gold) == 240
    assert [r["id"] for r in two] == [r["id"] for r in one]
    assert [r["gold"] for r in two] == gold  # the output is in input order
    assert [r["label"] for r in two] == [r["label"] for r in one]
    diff = max(abs(x["probs"][k] - y["probs"][k]) for x, y in zip(one, two) for k in x["probs"])
    assert diff <= 1e-5, diff
    assert not list(d.glob("p2.jsonl.*part*")) and not list(d.glob("p2.jsonl.merging"))


def test_a_two_process_predict_plans_its_job_for_two_processes(workdir, tiny_dir, monkeypatch):
    """The job a run records (progress files, then the job record) is planned in before_predict, before the
    datamodule is attached to the trainer: it must say 2 processes all the same, or the same command run again
    after a kill finds progress it cannot continue (test_faults.py runs that kill). In this process, without
    labeling: Lightning's launcher would re-run this process's command line, pytest's."""
    from finllm_pl.__main__ import FinLLMCLI
    from finllm_pl.predict import PredictionWriter

    monkeypatch.setattr(FinLLMCLI, "predict", lambda self, **kwargs: None)
    cli = cli_main(["predict", *PREDICT, *TWO, "--trainer.accelerator", "cpu", "--data.predict_output", "p.jsonl"])
    writer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter))
    assert cli.trainer.world_size == 2 and writer.expect["world"] == 2


# -- (iv) resume on another world size ---------------------------------------------------------------------------
def test_resuming_a_two_process_checkpoint_on_one_process_is_refused(ddp, capsys, monkeypatch):
    d = ddp["dir"]
    _ok(ddp["fit2"])
    monkeypatch.chdir(d)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", *FIT, "--model.accumulate_grad_batches", "1", "--trainer.limit_train_batches", "8",
                  "--checkpoint.dirpath", "ck_resume", "--trainer.logger", "false", "--ckpt_path", "ck2/last.ckpt"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "saved by a run on 2 process(es), resumed on 1" in err[0], err
    assert "--model.adapter_path" in err[0]
    assert not (d / "ck_resume").exists() or not list((d / "ck_resume").glob("*.ckpt"))


# -- (v) sharding and merging, without processes ---------------------------------------------------------------
def _global_batches(lengths, batch_size):
    return list(LengthGroupedBatchSampler(lengths, batch_size, seed=3, shuffle=True, world_size=1))


@pytest.mark.parametrize("n,batch_size,world", [(23, 4, 2), (24, 4, 2), (24, 4, 3), (10, 4, 3), (5, 4, 5),
                                                (1, 4, 2), (17, 3, 4)])
def test_train_sampler_shards_global_batches_over_ranks(n, batch_size, world):
    lengths = [(7 * i) % 11 + 1 for i in range(n)]
    glob = _global_batches(lengths, batch_size)
    per_rank = [list(LengthGroupedBatchSampler(lengths, batch_size, seed=3, shuffle=True, rank=r, world_size=world))
                for r in range(world)]
    k = -(-len(glob) // world)
    assert all(len(b) == k for b in per_rank), [len(b) for b in per_rank]  # ranks stay in step
    assert all(len(s) == k for s in (LengthGroupedBatchSampler(lengths, batch_size, rank=r, world_size=world)
                                     for r in range(world)))
    # rank r takes global batches r, r+W, ...; the padding that evens them out repeats batches from the start
    padded = glob + [glob[i % len(glob)] for i in range(k * world - len(glob))]
    for r in range(world):
        assert per_rank[r] == padded[r::world]
    seen = Counter(i for shard in per_rank for batch in shard for i in batch)
    assert set(seen) == set(range(n))
    dup = Counter(i for b in padded[len(glob):] for i in b)
    assert all(seen[i] == 1 + dup[i] for i in range(n))


@pytest.mark.parametrize("n,batch_size,world,max_tokens", [(48, 16, 2, None), (48, 16, 3, None), (48, 7, 3, None),
                                                            (5, 16, 3, None), (30, 4, 1, None), (48, 16, 3, 40),
                                                            (48, 16, 2, 5)])
def test_eval_sampler_counts_every_row_exactly_once(n, batch_size, world, max_tokens):
    lengths = [(5 * i) % 13 + 1 for i in range(n)]
    one = list(EvalBatchSampler(lengths, batch_size, max_tokens=max_tokens))
    shards = [list(EvalBatchSampler(lengths, batch_size, rank=r, world_size=world, max_tokens=max_tokens))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and all(
        len(s) == len(EvalBatchSampler(lengths, batch_size, rank=r, world_size=world, max_tokens=max_tokens))
        for r, s in enumerate(shards))
    if max_tokens:  # a token budget: no batch over it unless one row alone is longer
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i, _ in b) <= max_tokens for b in one)
        assert len(one) > -(-n // batch_size)  # it did cut more batches than the row count alone would
    counted = [i for s in shards for b in s for i, c in b if c]
    assert sorted(counted) == list(range(n))  # every row once
    # and each counted row sits in the very batch it has on one process (same padding, same scores)
    real = sorted((tuple(i for i, _ in b) for s in shards for b in s if all(c for _, c in b)))
    assert real == sorted(tuple(i for i, _ in b) for b in one)
    assert all(all(c for _, c in b) or not any(c for _, c in b) for s in shards for b in s)


def test_collate_eval_masks_uncounted_rows():
    import datasets

    ds = datasets.Dataset.from_dict({
        "input_ids": [[5, 6, 7, 8], [5, 6, 9], [5, 7, 7, 7, 8]], "labels": [[-100, -100, 7, 8], [-100, -100, 9],
                                                                            [-100, -100, -100, 7, 8]],
        "prompt_len": [2, 2, 3], "gold": [0, 2, 1], "length": [4, 3, 5]})
    rows = CountedRows(ds).__getitems__([(0, True), (1, False), (2, True)])
    assert [r["counted"] for r in rows] == [True, False, True] and rows[1]["input_ids"] == [5, 6, 9]
    batch = collate_eval(rows, 0, [[1], [2], [3]])
    assert batch["gold"].tolist() == [0, -1, 1]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100], [-100] * 5, [-100, -100, -100, 7, 8]]
    # rows without the flag (training-style batches) are all counted
    plain = collate_eval([dict(r, counted=True) for r in rows], 0, [[1]])
    assert plain["gold"].tolist() == [0, 2, 1] and (plain["labels"][1] != -100).sum() == 1


def _write_parts(output: Path, n_rows: int, chunk_rows: int, world: int) -> list[str]:
    """Part files as PredictionWriter leaves them: chunk c (rows in input order) appended to part c % world."""
    lines = [json.dumps({"id": f"r{i}", "text": "line\u2028sep" if i == 1 else "x"}, ensure_ascii=False) + "\n"
             for i in range(n_rows)]
    parts = [b""] * world
    c = s = 0
    while s < n_rows:
        size = chunk_size(c, chunk_rows, world)
        parts[c % world] += "".join(lines[s:s + size]).encode()
        c, s = c + 1, s + size
    for r in range(world):
        part_path(str(output), r).write_bytes(parts[r])
        Path(f"{part_path(str(output), r)}.json").write_text("{}")
    return lines


def test_chunks_start_small_and_double_on_each_rank_up_to_chunk_rows():
    assert [chunk_size(c, 16384, 1) for c in range(8)] == [256, 512, 1024, 2048, 4096, 8192, 16384, 16384]
    assert [chunk_size(c, 4096, 2) for c in range(9)] == [256, 256, 512, 512, 1024, 1024, 2048, 2048, 4096]
    assert chunk_size(10**6, 500, 1) == 500 and chunk_size(0, 5, 3) == 5


@pytest.mark.parametrize("first", [1024, 1], ids=["fixed", "growing"])  # 1: chunks of 1, 2, 4, ... rows
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n_rows,chunk_rows", [(0, 4), (3, 4), (8, 4), (9, 4), (10, 3), (13, 4), (25, 5)],
                         ids=lambda v: str(v))
def test_finish_output_merges_parts_back_into_input_order(tmp_path, monkeypatch, first, world, n_rows, chunk_rows):
    # (3, 4): one short chunk, ranks 1-2 have none; (9, 4): last chunk of 1 row; (10, 3) on 3 ranks: rank 0 has 2
    # chunks, the others 1; (8, 4) and (25, 5): all chunks full, parts of unequal chunk counts.
    monkeypatch.setattr(predict, "FIRST_CHUNK_ROWS", first)
    out = tmp_path / "out.jsonl"
    lines = _write_parts(out, n_rows, chunk_rows, world)
    finish_output(str(out), world, chunk_rows)
    assert out.read_text(encoding="utf-8") == "".join(lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # parts, progress and temp files gone


@pytest.mark.parametrize("first", [1024, 1], ids=["fixed", "growing"])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 3)])
def test_predict_stream_deals_each_row_to_exactly_one_rank(tmp_path, tiny_tokenizer, monkeypatch, first, world,
                                                           workers):
    """Rank r reads chunks r, r + world, ...; its DataLoader workers take turns over those (worker w of W the
    rank's w-th, (w + W)-th, ... chunk): every row exactly once, whole chunks of chunk_size rows, resumable by
    chunk; with fixed 5-row chunks and with chunks growing 1, 2, 4, 5, 5 rows on each rank."""
    monkeypatch.setattr(predict, "FIRST_CHUNK_ROWS", first)
    starts, c, s = [], 0, 0  # the first row of each chunk
    while s < 23:
        starts.append(s)
        c, s = c + 1, s + chunk_size(c, 5, world)
    assert first == 1024 or len(starts) > 5
    src = tmp_path / "in.txt"
    src.write_text("".join(f"headline number {i} {'up ' * (i % 5)}\n" for i in range(23)))
    fmt = PromptFormatter(tiny_tokenizer, "auto", "auto", None)
    labels = ["negative", "neutral", "positive"]

    def rows(rank, start=0):
        s = PredictStream(str(src), fmt, fmt.encode_labels(labels), "Sentiment?", "text", 3, 5, 64, labels,
                          rank=rank, world_size=world, start_chunk=start)
        out = []
        for w in range(workers):  # what each worker process of the rank's DataLoader yields
            monkeypatch.setattr(torch.utils.data, "get_worker_info",
                                lambda w=w: None if workers == 1 else types.SimpleNamespace(id=w, num_workers=workers))
            got = [(b["chunk"], index) for b in s for index, _, _ in b["rows"]]
            assert all((c // world) % workers == w for (c, _), _ in got)
            out += got
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
        return sorted(out, key=lambda x: (x[0][0], x[1]))

    got = {r: rows(r) for r in range(world)}
    indices = [i for r in got for _, i in got[r]]
    assert sorted(indices) == list(range(23))  # every row exactly once
    ends = starts[1:] + [23]
    for r, items in got.items():
        assert {c for (c, _), _ in items} == {c for c in range(len(starts)) if c % world == r}
        assert all(starts[c] <= i < ends[c] and size == ends[c] - starts[c] for (c, size), i in items)
    # a restart that recorded 1 finished chunk on each rank resumes at the rank's next chunk
    for r in range(world):
        assert [x for x in rows(r, start=1)] == [x for x in got[r] if x[0][0] // world >= 1]


def test_a_checkpoint_saved_mid_window_resumes_every_rank_s_partial_window(ddp):
    """Saved after the first micro-batch of a 2-micro-batch window on 2 ranks, a checkpoint holds what each rank
    accumulated (their gradients differ: different rows), and a resume gives each rank its own back: the resumed
    run's step and final adapter equal the uninterrupted run's. (Before: rank 0's partial gradients went to both
    ranks, and the resumed step differed.)"""
    d = ddp["dir"]
    save = json.dumps({"class_path": "ddp_probe.SaveAt", "init_args": {"batch": 2, "path": "mid.ckpt"}})
    args = ["fit", *FIT, *TWO, "--model.accumulate_grad_batches", "2", "--trainer.limit_train_batches", "4",
            "--trainer.logger", "false", "--checkpoint.every_n_train_steps", "100"]
    _ok(run_cli([*args, "--checkpoint.dirpath", "ck_mid_a", *losses_to("mid_a.json"), "--trainer.callbacks+=" + save], d))
    mid = torch.load(d / "mid.ckpt", weights_only=True)
    ranks = mid["finllm"]["window"]["ranks"]
    assert mid["global_step"] == 1 and [r["micro"] for r in ranks] == [1, 1]
    name = next(iter(ranks[0]["grads"]))
    assert not torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])  # each rank's own
    _ok(run_cli([*args, "--checkpoint.dirpath", "ck_mid_b", *losses_to("mid_b.json"), "--ckpt_path", "mid.ckpt"], d))
    a, b = step_log(d / "mid_a.json"), step_log(d / "mid_b.json")
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], rel=1e-6) and b[2]["grad_norm"] == pytest.approx(
        a[2]["grad_norm"], rel=1e-5)
    want, got = adapter_tensors(d / "ck_mid_a/last.ckpt"), adapter_tensors(d / "ck_mid_b/last.ckpt")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)

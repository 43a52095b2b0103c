"""Fault injection: SIGKILL during `fit` and `predict`, numerical faults in training, and safe loading.

Kill tests run the real command (`python -m finllm_pl ...`) as a child process, kill it with SIGKILL and run the
same command again, over and over; after every kill they check what is on disk, and at the end they compare with
an uninterrupted run. To hit the dangerous windows on purpose (inside a checkpoint write, between a step
checkpoint and `last.ckpt`, during the adapter export) the watcher freezes the child with SIGSTOP the moment it
sees the window open, checks the window is still open, and only then sends SIGKILL: a kill of a stopped process
is a kill at that instant, so "landed inside a save" is verified, not guessed.

The 20-kill fit, the 1,000,000-row labeling job, the 100,000-row memory baseline and the kills of 2-process
labeling jobs are marked slow:
    python -m pytest -q -m slow tests/test_faults.py -s
(-s prints the figures; with FINLLM_RESULTS=<folder> they are also written there as JSON).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

from finllm_pl.__main__ import cli_main
from finllm_pl.callbacks import AtomicCheckpointIO, load_checkpoint_file
from finllm_pl.errors import ModelError
from finllm_pl.predict import chunk_size

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
STEP_RE = re.compile(r"^step=(\d+)(?:-v\d+)?\.ckpt$")  # -vN: a copy beside an existing one (must not happen)


# ================================================================================================================
# Child processes
# ================================================================================================================
def _env() -> dict[str, str]:
    env = dict(os.environ)  # FINLLM_CACHE (the session's builtin model + tokenization cache) is inherited
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin at barriers slow a child 10x or more when the machine is busy (a parallel pytest,
    # other jobs): sleep instead. Threads and numbers stay the same.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class Child:
    """`python -m finllm_pl <args>` in `cwd`. `peak_rss_kb`: the highest VmHWM (peak resident set) sampled from
    /proc while it ran and just before a kill. (wait4's ru_maxrss is no good here: at exec Linux folds the
    parent's own peak into the child's, so a child of a big pytest process would report pytest's size.)"""

    def __init__(self, cwd: Path, args: list[str], log: Path, group: bool = False) -> None:
        self.log = log
        self._log_file = open(log, "wb")
        self.t0 = time.monotonic()
        # group: a session of its own, so that kill() reaches the processes it starts too (the other DDP ranks,
        # which Lightning's launcher starts by re-running the command)
        self.group = group
        self.proc = subprocess.Popen([sys.executable, "-m", "finllm_pl", *args], cwd=cwd, env=_env(),
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=group)
        self.rc: Optional[int] = None
        self.peak_rss_kb = 0
        self.wall = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        if self.rc is not None:
            return False
        pid, status, ru = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self._reaped(status, ru)
        return False

    def sample_rss(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass

    def _reaped(self, status, ru) -> None:
        self.rc = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.rc
        self.wall = time.monotonic() - self.t0
        self._log_file.close()

    def wait(self, timeout: float = 900) -> int:
        end = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"child ran over {timeout}s:\n{self.tail()}")
            time.sleep(0.05)
        return self.rc

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        # SIGSTOP is asynchronous: wait until the kernel reports the child stopped
        while self.alive():
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                        return
            except FileNotFoundError:
                return
            time.sleep(0.0002)

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.sample_rss()
        if self.group:
            os.killpg(self.pid, signal.SIGKILL)
        else:
            os.kill(self.pid, signal.SIGKILL)
        _, status, ru = os.wait4(self.pid, 0)
        self._reaped(status, ru)

    def kill_group(self) -> None:
        """What is left of a group child's processes dies (one that outlived its rank 0 would hold up the suite)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")


def _report(name: str, figures: dict) -> None:
    print(f"\n{name}: {json.dumps(figures, indent=2)}")
    out = os.environ.get("FINLLM_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


def _workspace(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "configs"):
        shutil.copytree(ROOT / sub, root / sub)
    return root


# ================================================================================================================
# 1. Crash-safe fit
# ================================================================================================================
def _fit_args(epochs: int, batches: int, batch_size: int = 4) -> list[str]:
    """The smoke config, a checkpoint after every optimizer step (accumulation 2: a step per 2 micro-batches)."""
    return ["fit", "--config", "configs/smoke.yaml", "--trainer.max_epochs", str(epochs),
            "--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--data.batch_size", str(batch_size), "--model.warmup_steps", "2",
            "--checkpoint.every_n_train_steps", "1", "--checkpoint.dirpath", "ck", "--trainer.default_root_dir",
            "run", *QUIET, "--ckpt_path", "last"]


def _listing(d: Path) -> dict[str, tuple[int, int, bool]]:
    """name -> (mtime_ns, size, is_dir) of everything in the checkpoint folder, temp files included."""
    out = {}
    try:
        with os.scandir(d) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out[e.name] = (st.st_mtime_ns, st.st_size, e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        pass
    return out


def _temps(listing, pid: Optional[int] = None) -> list[str]:
    """Checkpoint temp files (`.<name>.<pid>.<random>.tmp`, files.atomic_file), of process `pid` only when given
    (older ones are a killed run's leftovers, which the next save of that name removes)."""
    return sorted(n for n, (_, _, is_dir) in listing.items() if n.startswith(".") and n.endswith(".tmp")
                  and not is_dir and (pid is None or f".{pid}." in n))


def _export_temps(listing) -> list[str]:
    return sorted(n for n, (_, _, is_dir) in listing.items() if n.startswith(".adapter.") and is_dir)


def _step_files(listing) -> dict[int, str]:
    return {int(m.group(1)): n for n in listing if (m := STEP_RE.match(n))}


def _last_step(ck: Path) -> Optional[int]:
    last = ck / "last.ckpt"
    return int(load_checkpoint_file(str(last))["global_step"]) if last.exists() else None


def _check_checkpoints(ck: Path) -> Optional[int]:
    """Every checkpoint on disk loads (weights_only) and holds a finite adapter; returns last.ckpt's step."""
    for p in sorted(ck.glob("*.ckpt")):
        if p.is_symlink():
            assert p.resolve().exists(), f"{p.name} links to a missing file"
        ckpt = load_checkpoint_file(str(p))  # raises ModelError if unreadable
        assert "finllm" in ckpt and ckpt["state_dict"], p.name
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()), p.name
        m = STEP_RE.match(p.name)
        if m:
            assert ckpt["global_step"] == int(m.group(1)), p.name
    return _last_step(ck)


@dataclass
class FitTiming:
    startup: float  # launch -> first checkpoint file
    step: float  # seconds per optimizer step (with its two saves)
    wall: float
    steps: int


def _reference_fit(root: Path, args: list[str], in_process: bool = False) -> FitTiming:
    """The uninterrupted run of the same command: a child process, or (to save a process start in the fast test)
    cli_main in this process, which writes the same bytes (same code, threads and seeds)."""
    ws = _workspace(root)
    launched = time.time_ns()
    if in_process:
        cwd = os.getcwd()
        os.chdir(ws)
        try:
            cli_main(args)
        finally:
            os.chdir(cwd)
        wall = (time.time_ns() - launched) / 1e9
    else:
        child = Child(ws, args, ws / "fit.log")
        assert child.wait() == 0, child.tail()
        wall = child.wall
    steps = _step_files(_listing(ws / "ck"))
    times = sorted((ws / "ck" / n).stat().st_mtime_ns for n in steps.values())
    return FitTiming(startup=(times[0] - launched) / 1e9, step=(times[-1] - times[0]) / 1e9 / max(1, len(times) - 1),
                     wall=wall, steps=len(steps))


@dataclass
class KillStats:
    tried: int = 0
    survived: int = 0
    in_save: int = 0  # a checkpoint temp file was open when the kill landed
    in_save_partial: int = 0  # ... and was not even fully written yet
    between: int = 0  # a step checkpoint was newer than last.ckpt when the kill landed
    in_export: int = 0  # the adapter export folder was being written
    in_startup: int = 0  # before this attempt wrote any checkpoint
    modes: list = field(default_factory=list)
    attempts: int = 0


def _fit_attempt(ws: Path, args: list[str], mode: str, rng: random.Random, timing: FitTiming, k: int,
                 stats: KillStats) -> Child:
    """Run the command once and kill it as `mode` says ('none': let it finish). Modes:
      time     SIGKILL at a random moment of the process start (imports, data, model load, restore), that is
               within the shortest time a run has taken so far to write its first checkpoint;
      step     once a step checkpoint of this run is written, SIGKILL at a random moment of the next 2 steps;
      save     freeze when a checkpoint temp file is open; SIGKILL if it still is (else let it go on and retry);
      between  freeze when a step checkpoint has just been written; SIGKILL if last.ckpt is still older;
      export   freeze when the adapter export folder appears at the end of fit; SIGKILL.
    The targeted modes arm once last.ckpt exists and 0-1 (random) new step checkpoints were written."""
    ck = ws / "ck"
    before = _listing(ck)
    last_before = _last_step(ck)
    child = Child(ws, args, ws / f"attempt{k:02d}.log")
    skip = rng.randint(0, 1)
    deadline = rng.uniform(0.0, timing.startup)
    prev = before
    killed = False
    step_deadline = None
    while child.alive():
        now = _listing(ck)
        written = [n for n in now if STEP_RE.match(n) and before.get(n) != now[n]]
        just_written = [n for n in written if prev.get(n) != now[n]]
        armed = "last.ckpt" in now and len(written) >= skip
        if mode == "step" and written and step_deadline is None:
            step_deadline = time.monotonic() + rng.uniform(0.0, 2.0 * timing.step)
        if (mode == "time" and time.monotonic() - child.t0 >= deadline) or \
                (mode == "step" and step_deadline is not None and time.monotonic() >= step_deadline):
            child.kill()
            killed = True
        elif mode == "save" and armed and _temps(now, child.pid):
            child.stop()
            held = _listing(ck)
            if _temps(held, child.pid):
                child.kill()
                killed = True
                full = held.get("last.ckpt", (0, 0, False))[1]
                stats.in_save_partial += any(held[n][1] < 0.9 * full for n in _temps(held, child.pid))
            else:
                child.cont()
        elif mode == "between" and armed and just_written and len(written) > skip:
            child.stop()
            last = _last_step(ck)
            if last is None or last < max(_step_files(_listing(ck))):
                child.kill()
                killed = True
            else:
                child.cont()
        elif mode == "export" and set(_export_temps(now)) - set(_export_temps(before)):
            child.stop()
            child.kill()
            killed = True
        prev = now
        if killed:
            break
        if time.monotonic() - child.t0 > 900:
            child.kill()
            raise AssertionError(f"attempt {k} ({mode}) ran over 900 s:\n{child.tail()}")
        time.sleep(0.0005)
    stats.attempts += 1
    log = child.tail(20000)
    after = _listing(ck)
    first_write = min((v[0] for n, v in after.items() if before.get(n) != v), default=None)
    if first_write is not None:  # how long a start takes, for the next 'time' kill
        timing.startup = min(timing.startup, first_write / 1e9 - (time.time() - (time.monotonic() - child.t0)))
    if killed:
        assert child.rc == -signal.SIGKILL, log
        stats.tried += 1
        stats.modes.append(mode)
        written = [int(STEP_RE.match(n).group(1)) for n in after if STEP_RE.match(n) and before.get(n) != after[n]]
        last_now = _last_step(ck)
        in_save = bool(_temps(after, child.pid))  # a checkpoint temp file of this run was open at the kill
        stats.in_save += in_save
        stats.between += bool(written) and (last_now is None or last_now < max(written))
        stats.in_export += bool(set(_export_temps(after)) - set(_export_temps(before)))
        stats.in_startup += not written and not in_save
    else:
        assert child.rc == 0, f"attempt {k} ({mode}) failed on its own (rc {child.rc}):\n{log}"
    # What every kill must leave: readable checkpoints, and last.ckpt never older than before this attempt
    last_after = _check_checkpoints(ck)
    if last_before is not None:
        assert last_after is not None and last_after >= last_before, (last_before, last_after)
        # this run resumed from last.ckpt: it never rewrote a checkpoint at or before that step
        rewritten = [int(STEP_RE.match(n).group(1)) for n in after if STEP_RE.match(n) and before.get(n) != after[n]]
        assert all(s > last_before for s in rewritten), (last_before, sorted(rewritten), log)
        if "Restored all states" in log:
            assert re.search(r"Restored all states from the checkpoint at \S*ck/last\.ckpt", log), log
    return child


def _fit_under_kills(tmp: Path, args: list[str], modes: list[str], seed: int, in_process_reference=False) -> dict:
    timing = _reference_fit(tmp / "reference", args, in_process_reference)
    ref_startup = timing.startup
    ws = _workspace(tmp / "killed")
    rng = random.Random(seed)
    stats = KillStats()
    t0 = time.monotonic()
    for k, mode in enumerate(modes):
        child = _fit_attempt(ws, args, mode, rng, timing, k, stats)
        assert child.rc == -signal.SIGKILL, f"kill {k} ({mode}) never landed: the run finished first\n{child.tail()}"
        stats.survived += k > 0  # the kill before this one left checkpoints this run resumed from, as checked
    final = _fit_attempt(ws, args, "none", rng, timing, len(modes), stats)
    assert final.rc == 0
    log = final.tail(20000)
    assert "Restored all states from the checkpoint at" in log, log
    stats.survived += 1  # ... and the last kill too: the run that followed it finished, resumed from last.ckpt

    ref_ck, ck = tmp / "reference" / "ck", ws / "ck"
    # The same checkpoints as the uninterrupted run, bit for bit, and the same adapter file
    ref_steps, steps = _step_files(_listing(ref_ck)), _step_files(_listing(ck))
    assert sorted(p.name for p in ck.glob("step=*.ckpt")) == sorted(p.name for p in ref_ck.glob("step=*.ckpt")), \
        "a step checkpoint is missing or has a -vN copy"
    assert sorted(p.name for p in ck.glob("last*.ckpt")) == ["last.ckpt"]
    for name in [*ref_steps.values(), "last.ckpt"]:
        a, b = load_checkpoint_file(str(ref_ck / name)), load_checkpoint_file(str(ck / name))
        assert a["global_step"] == b["global_step"], name
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (name, key)
        for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
            assert all(torch.equal(sa[x], sb[x]) for x in ("exp_avg", "exp_avg_sq")), name
    ref_adapter = (ref_ck / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (ck / "adapter" / "adapter_model.safetensors").read_bytes() == ref_adapter
    assert not list((ck / "adapter").glob("*.bin")), "adapter weights must be safetensors only"
    leftovers = sorted(p.name for p in ck.iterdir() if p.name.startswith("."))
    assert not leftovers, f"temp files left behind: {leftovers}"
    return {"kills_tried": stats.tried, "kills_survived": stats.survived, "landed_in_checkpoint_write": stats.in_save,
            "of_which_before_the_bytes_were_all_written": stats.in_save_partial,
            "landed_between_step_checkpoint_and_last": stats.between, "landed_in_adapter_export": stats.in_export,
            "landed_before_any_checkpoint_of_that_run": stats.in_startup, "modes": stats.modes,
            "optimizer_steps": timing.steps, "reference_wall_s": round(timing.wall, 1),
            "reference_startup_s": round(ref_startup, 1), "fastest_restart_s": round(timing.startup, 1),
            "s_per_step": round(timing.step, 2),
            "killed_runs_wall_s": round(time.monotonic() - t0, 1),
            "final_adapter_bit_identical": True, "checkpoints_bit_identical": len(ref_steps) + 1}


def test_fit_survives_two_kills_in_checkpoint_writes(tmp_path, tiny_dir):
    """Fast variant: one kill inside a checkpoint write, one between a step checkpoint and last.ckpt."""
    figures = _fit_under_kills(tmp_path, _fit_args(1, 12), ["save", "between"], seed=1, in_process_reference=True)
    _report("fit_kills_fast", figures)
    assert figures["kills_survived"] == figures["kills_tried"] == 2
    assert figures["landed_in_checkpoint_write"] >= 1 and figures["landed_between_step_checkpoint_and_last"] >= 1


@pytest.mark.slow
def test_fit_survives_twenty_kills(tmp_path, tiny_dir):
    """20 SIGKILLs at seeded-random moments over a 60-step run (2 epochs), resumed each time with --ckpt_path last."""
    rng = random.Random(2024)
    modes = ["save"] * 6 + ["between"] * 4 + ["step"] * 5 + ["time"] * 4
    rng.shuffle(modes)
    modes.append("export")  # the last kill: while the adapter is being exported at the end of the run
    figures = _fit_under_kills(tmp_path, _fit_args(2, 60, batch_size=2), modes, seed=2024)
    _report("fit_kills_slow", figures)
    assert figures["kills_survived"] == figures["kills_tried"] == 20
    assert figures["landed_in_checkpoint_write"] >= 6
    assert figures["landed_between_step_checkpoint_and_last"] >= 4
    assert figures["landed_in_adapter_export"] == 1


# ================================================================================================================
# 2. Crash-safe labeling
# ================================================================================================================
def _write_input(path: Path, n: int) -> None:
    verbs = ["rose", "fell", "was flat", "jumped", "slumped", "held steady"]
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            f.write("".join(
                f'{{"id": "r{i:07d}", "text": "Company {i % 9973} shares {verbs[i % 6]} {i % 97} percent."}}\n'
                for i in range(start, min(n, start + 100_000))))


def _predict_args(chunk_rows: int, workers: int = 0, output: str = "out/labels.jsonl") -> list[str]:
    # A short instruction: the job is about surviving kills, and short prompts label ~2x faster on a CPU.
    return ["predict", "--config", "configs/smoke.yaml", "--data.predict_path", "in.jsonl", "--data.predict_output",
            output, "--data.eval_batch_size", "256", "--data.predict_chunk_rows", str(chunk_rows),
            "--data.instruction", "Sentiment?", "--data.num_workers", str(workers), *QUIET]


def _progress(ws: Path) -> Optional[dict]:
    p = ws / "out" / "labels.jsonl.part0.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None


def _check_output(path: Path, n: int) -> dict:
    """Rows lost, duplicated and out of order in the output (ids are r0000000.. in input order)."""
    seen = bytearray(n)
    lines = dup = out_of_order = bad = 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            lines += 1
            rec = json.loads(line)
            k = int(rec["id"][1:])
            if seen[k]:
                dup += 1
            seen[k] = 1
            out_of_order += k != i
            bad += rec["label"] not in ("negative", "neutral", "positive") or \
                not math.isclose(sum(rec["probs"].values()), 1.0, abs_tol=1e-4)
    return {"rows_in": n, "rows_out": lines, "rows_lost": n - sum(seen), "rows_duplicated": dup,
            "rows_out_of_order": out_of_order, "malformed_rows": bad}


def _label_under_kills(ws: Path, n: int, kills: int, chunk_rows: int, seed: int, workers: int = 0) -> dict:
    _write_input(ws / "in.jsonl", n)
    (ws / "out").mkdir()
    args = _predict_args(chunk_rows, workers)
    rng = random.Random(seed)
    # kill k arms when the job has recorded targets[k] rows, then lands after a random delay (mid-chunk, mid-write,
    # anywhere); targets leave the last chunks alone so that each kill lands before the job completes
    targets = sorted(rng.randrange(n - 3 * chunk_rows) for _ in range(kills))
    peaks, walls, progress_at_kill = [], [], []
    t0 = time.monotonic()
    for k in range(kills + 1):
        child = Child(ws, args, ws / f"attempt{k}.log")
        target = targets[k] if k < kills else None
        killed = False
        delay_after = rng.uniform(0.0, 1.0)
        armed_at = None
        while child.alive():
            child.sample_rss()
            if target is not None:
                prog = _progress(ws)
                if armed_at is None and (prog or {}).get("rows", 0) >= target:
                    armed_at = time.monotonic()
                if armed_at is not None and (time.monotonic() - armed_at >= delay_after
                                             or (prog or {}).get("rows", 0) >= n - chunk_rows):
                    child.kill()
                    killed = True
                    break
            if time.monotonic() - child.t0 > 3600:
                child.kill()
                raise AssertionError(f"labeling attempt {k} ran over an hour:\n{child.tail()}")
            time.sleep(0.01)
        peaks.append(child.peak_rss_kb)
        walls.append(child.wall)
        if k < kills:
            assert killed, f"kill {k} never landed (target {target} rows): the job finished first\n{child.tail()}"
            assert child.rc == -signal.SIGKILL
            assert not (ws / "out" / "labels.jsonl").exists(), "the output appeared before the job finished"
            prog = _progress(ws)
            if prog is not None:  # the record of progress is whole, and the part file holds at least that much
                assert (ws / "out" / "labels.jsonl.part0").stat().st_size >= prog["bytes"]
            progress_at_kill.append(prog["rows"] if prog else 0)
        else:
            assert child.rc == 0, child.tail()
    kept = ("labels.jsonl", "labels.jsonl.job.json")  # the output and its job record
    leftovers = sorted(p.name for p in (ws / "out").iterdir() if p.name not in kept)
    assert not leftovers, f"part/temp files left: {leftovers}"
    assert (ws / "out" / "labels.jsonl.job.json").exists(), "the finished output has no job record"
    check = _check_output(ws / "out" / "labels.jsonl", n)
    return {**check, "kills_tried": kills, "kills_survived": kills if check["rows_lost"] == check["rows_duplicated"]
            == check["rows_out_of_order"] == 0 else 0, "rows_done_at_each_kill": progress_at_kill,
            "peak_rss_mb_per_run": [round(p / 1024, 1) for p in peaks], "wall_s_per_run": [round(w, 1) for w in walls],
            "total_wall_s": round(time.monotonic() - t0, 1)}


def _assert_complete(figures: dict) -> None:
    assert figures["rows_out"] == figures["rows_in"]
    assert figures["rows_lost"] == figures["rows_duplicated"] == figures["rows_out_of_order"] == 0
    assert figures["malformed_rows"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_labeling_survives_two_kills(tmp_path, tiny_dir, workers):
    """Also with DataLoader workers taking turns by chunk (chunks finish out of order; the output may not)."""
    ws = _workspace(tmp_path / "job")
    figures = _label_under_kills(ws, 20_000, kills=2, chunk_rows=2048, seed=3, workers=workers)
    _report(f"predict_kills_fast_w{workers}", figures)
    _assert_complete(figures)
    assert max(figures["peak_rss_mb_per_run"]) < 2048


@pytest.mark.slow
def test_labeling_a_million_rows_survives_five_kills_in_bounded_memory(tmp_path, tiny_dir):
    base_ws = _workspace(tmp_path / "base")
    _write_input(base_ws / "in.jsonl", 100_000)
    (base_ws / "out").mkdir()
    base = Child(base_ws, _predict_args(4096), base_ws / "run.log")
    while base.alive():
        base.sample_rss()
        time.sleep(0.01)
    assert base.rc == 0, base.tail()
    base_check = _check_output(base_ws / "out" / "labels.jsonl", 100_000)
    assert base_check["rows_lost"] == base_check["rows_duplicated"] == base_check["rows_out_of_order"] == 0

    ws = _workspace(tmp_path / "job")
    figures = _label_under_kills(ws, 1_000_000, kills=5, chunk_rows=4096, seed=5)
    figures["baseline_100k_peak_rss_mb"] = round(base.peak_rss_kb / 1024, 1)
    figures["baseline_100k_wall_s"] = round(base.wall, 1)
    figures["rows_per_s_100k_incl_startup"] = round(100_000 / base.wall, 1)
    _report("predict_kills_slow", figures)
    _assert_complete(figures)
    peak = max(figures["peak_rss_mb_per_run"])
    assert peak < 2048
    # Memory does not grow with the input: 10x the rows, at most a few MB more (8 bytes per id for the check)
    assert peak - figures["baseline_100k_peak_rss_mb"] < 32, figures


# -- the two narrow windows of the labeling writer, hit exactly by failing at that line -------------------------
class _Crash(BaseException):
    """Stands for a kill at this point (BaseException: nothing in the product catches it)."""


def _in_process_args(ws: Path, *extra: str) -> list[str]:
    return ["predict", "--config", str(ROOT / "configs/smoke.yaml"), "--data.predict_path", str(ws / "in.jsonl"),
            "--data.predict_output", str(ws / "out" / "labels.jsonl"), "--data.predict_chunk_rows", "5",
            "--data.eval_batch_size", "4", *QUIET, *extra]


def _predict_in_process(ws: Path, *extra: str) -> list[dict]:
    cli_main(_in_process_args(ws, *extra))
    with open(ws / "out" / "labels.jsonl") as f:
        return [json.loads(line) for line in f]


def _killed_after_a_part_write_before_its_progress_record(ws: Path, monkeypatch) -> list[dict]:
    """A 1-process job of 23 rows (chunks of 5) killed once its second chunk is in the part file (fsync'd) but its
    progress record was never written: what that leaves in ws/out. Returns an uninterrupted run's rows."""
    import finllm_pl.predict as predict

    monkeypatch.chdir(ws)  # whatever the run writes beside its output stays in the test's folder
    _write_input(ws / "in.jsonl", 23)
    (ws / "out").mkdir()
    want = _predict_in_process(ws)
    (ws / "out" / "labels.jsonl").unlink()
    real, calls = predict._write_progress, []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise _Crash()
        return real(*a, **k)

    monkeypatch.setattr(predict, "_write_progress", crash_on_second)
    with pytest.raises(_Crash):
        _predict_in_process(ws)
    monkeypatch.setattr(predict, "_write_progress", real)  # (not monkeypatch.undo(): it would undo the chdir too)
    return want


def test_labeling_recovers_when_killed_after_a_part_write_before_its_progress_record(tmp_path, monkeypatch):
    want = _killed_after_a_part_write_before_its_progress_record(tmp_path, monkeypatch)
    part, prog = tmp_path / "out" / "labels.jsonl.part0", _progress(tmp_path)
    assert prog["chunks"] == 1 and part.stat().st_size > prog["bytes"]  # more bytes than recorded
    got = _predict_in_process(tmp_path)
    assert got == want
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["labels.jsonl", "labels.jsonl.job.json"]


def test_labeling_recovers_when_killed_between_the_final_rename_and_the_cleanup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_input(tmp_path / "in.jsonl", 12)
    (tmp_path / "out").mkdir()
    real_unlink = Path.unlink

    def crash_on_progress_cleanup(self, *a, **k):
        if self.name.endswith(".part0.json"):
            raise _Crash()
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", crash_on_progress_cleanup)
    with pytest.raises(_Crash):
        _predict_in_process(tmp_path)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    out = tmp_path / "out"
    assert (out / "labels.jsonl").exists() and (out / "labels.jsonl.part0.json").exists()
    first = (out / "labels.jsonl").read_text()
    got = _predict_in_process(tmp_path)  # the same command again
    assert [r["id"] for r in got] == [f"r{i:07d}" for i in range(12)]
    assert (out / "labels.jsonl").read_text() == first
    assert sorted(p.name for p in out.iterdir()) == ["labels.jsonl", "labels.jsonl.job.json"]


# -- several processes: a job of 2 DDP processes (gloo on CPU) killed, and run again -------------------------------
TWO = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def _recorded_rows(ws: Path, world: int = 2) -> list[int]:
    """The rows each rank's progress record says its part file holds (0 before its first record)."""
    rows = []
    for r in range(world):
        try:
            rows.append(json.loads((ws / "out" / f"labels.jsonl.part{r}.json").read_text())["rows"])
        except FileNotFoundError:
            rows.append(0)
    return rows


def _kill_two_processes_midway(ws: Path, args: list[str], log: Path) -> list[int]:
    """Run the 2-process command and SIGKILL all its processes once every rank has recorded a chunk; returns the rows
    each rank had recorded (read after the kill: what a rerun finds)."""
    child = Child(ws, args, log, group=True)
    try:
        while child.alive():
            if min(_recorded_rows(ws)) > 0:
                child.kill()
                break
            if time.monotonic() - child.t0 > 600:
                raise AssertionError(f"2-process labeling ran over 600 s:\n{child.tail()}")
            time.sleep(0.01)
    finally:
        child.kill_group()
    assert child.rc == -signal.SIGKILL, f"the kill never landed: the job finished first\n{child.tail()}"
    assert not (ws / "out" / "labels.jsonl").exists(), "the output appeared before the job finished"
    return _recorded_rows(ws)


def _run(ws: Path, args: list[str], log: Path) -> Child:
    child = Child(ws, args, log, group=True)
    try:
        child.wait(600)
    finally:
        child.kill_group()
    return child


def _read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _assert_same_labels(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["label"] for r in got] == [r["label"] for r in want]
    diff = max(abs(g["probs"][k] - w["probs"][k]) for g, w in zip(got, want) for k in w["probs"])
    assert diff <= 1e-5, diff


def _rows_of_rank(n: int, chunk_rows: int, world: int, rank: int) -> int:
    """How many of n input rows rank `rank` labels: chunk c (chunk_size rows) goes to rank c % world."""
    rows, c, start = 0, 0, 0
    while start < n:
        size = min(chunk_size(c, chunk_rows, world), n - start)
        rows += size if c % world == rank else 0
        start, c = start + size, c + 1
    return rows


def _resume_refusal(output: str, rows: int, old: str, new: str) -> str:
    return (f"error: {output}: an interrupted run of this job labeled {rows} rows with {old}, this run has {new}; a "
            "job resumes only as it was split over processes and chunks: run it again with "
            f"{old} to resume it, or delete {output}.part* to label it from the start")


@pytest.mark.slow
def test_a_two_process_labeling_job_killed_midway_resumes_where_it_stopped(tmp_path, tiny_dir, monkeypatch):
    """2 gloo processes killed (both) once each rank has a chunk in its part file: the same command again finishes
    the job, its output equal to one uninterrupted process's row for row, rank 0 labeling only the rows it had not
    recorded; a third run finds the job done. 40-45 s on 2 shared CPU cores."""
    n, chunk_rows = 4000, 256
    ws = _workspace(tmp_path / "job")
    _write_input(ws / "in.jsonl", n)
    (ws / "out").mkdir()
    monkeypatch.chdir(ws)
    cli_main(_predict_args(chunk_rows, output="ref.jsonl"))  # the reference: 1 process, never stopped
    want = _read_rows(ws / "ref.jsonl")
    args = [*_predict_args(chunk_rows), *TWO]

    recorded = _kill_two_processes_midway(ws, args, ws / "attempt0.log")
    again = _run(ws, args, ws / "attempt1.log")
    assert again.rc == 0, again.tail()
    _assert_complete(_check_output(ws / "out" / "labels.jsonl", n))
    _assert_same_labels(_read_rows(ws / "out" / "labels.jsonl"), want)
    assert sorted(p.name for p in (ws / "out").iterdir()) == ["labels.jsonl", "labels.jsonl.job.json"]
    # resumed, not started over: rank 0 labeled only what its part file did not hold yet
    done = re.search(rf"labeled {n} rows -> out/labels.jsonl \((\d+) by this process", again.tail(20000))
    assert done is not None, again.tail()
    assert int(done.group(1)) == _rows_of_rank(n, chunk_rows, 2, 0) - recorded[0], (done.group(0), recorded)

    first = (ws / "out" / "labels.jsonl").read_bytes()
    third = _run(ws, args, ws / "attempt2.log")
    assert third.rc == 0, third.tail()
    assert f"out/labels.jsonl: already labeled ({n} rows of in.jsonl, same labels, prompt and model)" in third.tail()
    assert (ws / "out" / "labels.jsonl").read_bytes() == first


@pytest.mark.slow
def test_a_two_process_job_is_not_resumed_on_one_process(tmp_path, tiny_dir):
    """What 2 ranks recorded cannot be continued by 1 (rank r holds chunks r, r + 2, ..., whose sizes follow from
    the world size): the 1-process run stops before the model loads, with one line saying what to do, and changes
    no file; doing what it says (deleting the part files) labels the whole file on 1 process. 30-37 s."""
    n, chunk_rows = 4000, 256
    ws = _workspace(tmp_path / "job")
    _write_input(ws / "in.jsonl", n)
    (ws / "out").mkdir()
    recorded = _kill_two_processes_midway(ws, [*_predict_args(chunk_rows), *TWO], ws / "attempt0.log")

    before = {p.name: p.read_bytes() for p in (ws / "out").iterdir()}
    one = _run(ws, _predict_args(chunk_rows), ws / "attempt1.log")
    assert one.rc == 2, one.tail()
    errors = [line for line in one.tail(20000).splitlines() if line.startswith("error:")]
    assert errors == [_resume_refusal("out/labels.jsonl", sum(recorded), "2 processes", "1 process")]
    assert {p.name: p.read_bytes() for p in (ws / "out").iterdir()} == before

    for p in (ws / "out").glob("labels.jsonl.part*"):
        p.unlink()
    fresh = _run(ws, _predict_args(chunk_rows), ws / "attempt2.log")
    assert fresh.rc == 0, fresh.tail()
    _assert_complete(_check_output(ws / "out" / "labels.jsonl", n))
    assert sorted(p.name for p in (ws / "out").iterdir()) == ["labels.jsonl", "labels.jsonl.job.json"]


def test_a_one_process_job_is_not_resumed_on_two_processes(tmp_path, monkeypatch):
    """The other way round: a 1-process job stopped after its first chunk, run again on 2 processes, stops with the
    same line (before Lightning starts the second process: one line) and changes nothing; on 1 process it resumes."""
    want = _killed_after_a_part_write_before_its_progress_record(tmp_path, monkeypatch)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # (a child process: Lightning's launcher re-runs the command line, which in this process is pytest's)
    two = _run(tmp_path, _in_process_args(tmp_path, *TWO), tmp_path / "two.log")
    assert two.rc == 2, two.tail()
    errors = [line for line in two.tail(20000).splitlines() if line.startswith("error:")]
    assert errors == [_resume_refusal(str(out / "labels.jsonl"), 5, "1 process", "2 processes")]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _predict_in_process(tmp_path) == want


# ================================================================================================================
# 3. Numerical faults
# ================================================================================================================
class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison_loss(monkeypatch, bad_micro_batches, kind: str) -> list[int]:
    """Replace the plain backend's loss (the fault runs use it: _fault_args): training micro-batches in
    `bad_micro_batches` get a non-finite loss or gradient (validation, under no_grad, is left alone). Returns the
    list of poisoned calls."""
    from finllm_pl.backend.plain import PlainBackend

    real, count, hit = PlainBackend.loss_sum, [0], []

    def loss_sum(backend, *a, **k):
        loss, n = real(backend, *a, **k)
        if not torch.is_grad_enabled():
            return loss, n
        i = count[0]
        count[0] += 1
        if i in bad_micro_batches:
            hit.append(i)
            loss = {"nan-loss": lambda x: x * float("nan"), "inf-loss": lambda x: x * float("inf"),
                    "nan-grad": _NanGrad.apply, "overflow": lambda x: x * 1e6}[kind](loss)
        return loss, n

    monkeypatch.setattr(PlainBackend, "loss_sum", loss_sum)
    return hit


def _fault_args(batches: int, *extra: str) -> list[str]:
    """fit arguments without the subcommand (cli_main(args, run=False) takes none; prepend "fit" to run)."""
    return ["--config", "configs/smoke.yaml", "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
            str(batches), "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--data.batch_size", "4", "--model.warmup_steps", "1",
            "--checkpoint.every_n_train_steps", "1", "--checkpoint.dirpath", "ck", "--trainer.log_every_n_steps", "1",
            "--trainer.logger", '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}',
            "--model.backend", "plain", *extra]  # (fault handling is the trainer's: the plain backend's loss is poisoned)


class _Snapshots:
    def __init__(self):
        self.after_batch: dict[int, dict[str, torch.Tensor]] = {}
        self.steps: dict[int, int] = {}

    def attach(self, trainer):
        from lightning.pytorch import Callback

        snaps = self

        class Snap(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                snaps.after_batch[batch_idx] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                                                if p.requires_grad}
                snaps.steps[batch_idx] = trainer.global_step

        trainer.callbacks.append(Snap())


@pytest.mark.parametrize("kind", ["nan-loss", "inf-loss", "nan-grad"])
def test_a_nonfinite_step_is_skipped_counted_and_logged(kind, workdir, monkeypatch):
    hit = _poison_loss(monkeypatch, {2}, kind)  # micro-batch 2: the second accumulation window (batches 2-3)
    cli = cli_main(_fault_args(8), run=False)  # 8 micro-batches at accumulation 2: 4 windows
    snaps = _Snapshots()
    snaps.attach(cli.trainer)
    with pytest.warns(UserWarning, match="non-finite loss or gradient; optimizer step skipped"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert hit == [2]
    # window 2's step is skipped on the device but counts (global step, LR schedule), as fp16 loss scaling does
    assert snaps.steps == {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4}
    for name, before in snaps.after_batch[1].items():  # and did not move the adapter
        assert torch.equal(snaps.after_batch[3][name], before), name
    opt = cli.trainer.optimizers[0]
    assert all(int(st["step"]) == 3 for st in opt.state.values())  # nor the Adam moments: 3 updates of 4 steps
    assert any(not torch.equal(snaps.after_batch[5][n], b) for n, b in snaps.after_batch[3].items())
    assert all(torch.isfinite(p).all() for p in snaps.after_batch[7].values())
    assert sorted(p.name for p in Path("ck").glob("step=*.ckpt")) == [f"step=00000{i}.ckpt" for i in (1, 2, 3, 4)]
    assert load_checkpoint_file("ck/last.ckpt")["finllm"]["nonfinite_steps"] == 1
    # counted, and logged every step as a running total (so a logger that samples steps cannot miss it)
    assert float(cli.trainer.callback_metrics["train/nonfinite_steps"]) == 1.0
    import csv

    with open(next(Path("logs").rglob("metrics.csv"))) as f:
        logged = [float(r["train/nonfinite_steps"]) for r in csv.DictReader(f) if r.get("train/nonfinite_steps")]
    assert logged and logged[-1] == 1.0 and logged[0] == 0.0


def test_k_nonfinite_steps_in_a_row_stop_with_one_line_and_a_checkpoint_from_before(workdir, monkeypatch, capsys):
    from finllm_pl.backend.plain import PlainBackend

    real = PlainBackend.loss_sum
    _poison_loss(monkeypatch, set(range(4, 100)), "nan-loss")  # windows 0 and 1 fine, every later one NaN
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *_fault_args(12, "--model.max_nonfinite_steps", "3")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: 3 optimizer steps in a row had a non-finite loss or gradient; stopping. They were "
                     "skipped: the adapter in the last checkpoint is the one from before them. Lower "
                     "model.learning_rate or check the data, then resume with --ckpt_path last"], err
    ck = Path("ck")
    # steps 3-5 were skipped (they count): their checkpoints hold step 2's adapter, and the count
    assert sorted(p.name for p in ck.glob("*.ckpt")) == ["last.ckpt"] + [f"step=00000{i}.ckpt" for i in range(1, 6)]
    last = load_checkpoint_file("ck/last.ckpt")
    step2 = load_checkpoint_file("ck/step=000002.ckpt")
    assert last["global_step"] == 5 and last["finllm"]["nonfinite_steps"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.equal(last["state_dict"][k], step2["state_dict"][k]) for k in step2["state_dict"])
    assert not (ck / "adapter").exists() and not list(ck.glob(".*"))
    # the fault gone (say, the data fixed), the same command resumes from that checkpoint and finishes
    monkeypatch.setattr(PlainBackend, "loss_sum", real)  # (not monkeypatch.undo(): that would undo workdir's chdir)
    cli = cli_main(["fit", *_fault_args(12, "--model.max_nonfinite_steps", "3", "--ckpt_path", "last")])
    assert cli.trainer.global_step == 6 and (ck / "adapter" / "adapter_model.safetensors").exists()


def _fp16(cli, init_scale: float) -> None:
    """Lightning will not build fp16 mixed precision on a CPU (it switches to bf16-mixed, which has no scaler: see
    test_lightning_gives_no_fp16_scaler_on_cpu); torch's CPU autocast and GradScaler do run fp16, so these tests
    install the very plugin a 16-mixed GPU run gets: MixedPrecision('16-mixed') with a GradScaler."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    cli.trainer.strategy.precision_plugin = MixedPrecision(
        "16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6))


def test_lightning_gives_no_fp16_scaler_on_cpu():
    from lightning.pytorch import Trainer

    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = Trainer(accelerator="cpu", precision="16-mixed", logger=False, enable_checkpointing=False)
    assert trainer.precision == "bf16-mixed" and getattr(trainer.precision_plugin, "scaler", None) is None


def test_fp16_overflow_is_handled_by_the_scaler(workdir, monkeypatch):
    hit = _poison_loss(monkeypatch, {2}, "overflow")  # a finite loss whose fp16 backward overflows
    cli = cli_main(_fault_args(8, "--model.compute_dtype", "float16", "--model.lora_dropout", "0"), run=False)
    _fp16(cli, init_scale=64.0)
    snaps = _Snapshots()
    snaps.attach(cli.trainer)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert hit == [2]
    for name, before in snaps.after_batch[1].items():  # the overflowing window did not move the adapter
        assert torch.equal(snaps.after_batch[3][name], before), name
    assert any(not torch.equal(snaps.after_batch[5][n], b) for n, b in snaps.after_batch[3].items())
    assert cli.trainer.precision_plugin.scaler.get_scale() == 32.0  # the scaler skipped that step and backed off
    assert all(torch.isfinite(p).all() for p in snaps.after_batch[7].values())
    assert float(cli.trainer.callback_metrics["train/nonfinite_steps"]) == 0.0  # the scaler's business, not a fault


def test_fp16_gradient_clipping_does_not_depend_on_the_loss_scale(workdir):
    """Loss scaling must be invisible: the same run at two loss scales gives the same adapter, clipping included
    (the gradients are still scaled when they are clipped)."""
    adapters = []
    for scale in (2.0**6, 2.0**10):
        cli = cli_main(_fault_args(6, "--model.compute_dtype", "float16", "--model.lora_dropout", "0",
                                   "--model.gradient_clip_val", "0.5", "--checkpoint.dirpath", f"ck{int(scale)}"),
                       run=False)
        _fp16(cli, init_scale=scale)
        cli.trainer.fit(cli.model, cli.datamodule)
        assert cli.trainer.global_step == 3 and cli.trainer.precision_plugin.scaler.get_scale() == scale
        adapters.append({n: p.detach().clone() for n, p in cli.model.model.named_parameters() if p.requires_grad})
    for name, a in adapters[0].items():
        b = adapters[1][name]
        assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max()) + 1e-8, name


# ================================================================================================================
# 5. Safe loading
# ================================================================================================================
class _Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint or adapter file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_trust_remote_code_is_off_unless_the_config_turns_it_on(tmp_path, tiny_dir, capsys):
    import inspect
    import yaml

    from finllm_pl import model as hf
    from finllm_pl.data import InstructionDataModule
    from finllm_pl.module import FinLLM

    for fn in (FinLLM.__init__, InstructionDataModule.__init__, hf.load_tokenizer, hf.load_base_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        with pytest.raises(SystemExit):
            cli_main(["fit", "--config", str(config), "--print_config"])
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["model"]["trust_remote_code"] is False, config  # data.trust_remote_code is linked to it
        assert cfg["data"].get("trust_remote_code", False) is False, config

    # A model folder that ships code (auto_map): loading it does not run the code unless asked to.
    folder = tmp_path / "model_with_code"
    shutil.copytree(tiny_dir, folder)
    marker = tmp_path / "CODE_RAN"
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "class CustomConfig(Qwen2Config):\n    pass\n"
        "class CustomModel(Qwen2ForCausalLM):\n    config_class = CustomConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    hf.load_tokenizer(str(folder))
    model = hf.load_base_model(str(folder), quantization="none", compute_dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not marker.exists()
    # the control: with trust_remote_code on, that code does run (so the check above can fail)
    try:
        hf.load_base_model(str(folder), quantization="none", compute_dtype=torch.float32, trust_remote_code=True)
    except ModelError:
        pass
    assert marker.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_checkpoints_load_weights_only_and_never_run_code(tmp_path, zipped):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "finllm": _Payload(marker)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(ModelError, match="evil.ckpt: checkpoint is corrupted or not a checkpoint"):
        load_checkpoint_file(str(path))
    with pytest.raises(ModelError):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: a loader that unpickles freely runs the payload
    assert marker.exists()


def test_adapters_are_safetensors_and_a_pickled_adapter_is_refused(tmp_path, tiny_dir, workdir, capsys):
    from safetensors import safe_open

    from finllm_pl import model as hf

    base = hf.load_base_model(str(tiny_dir), quantization="none", compute_dtype=torch.float32)
    peft_model = hf.add_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])
    out = hf.export_adapter(peft_model, hf.load_tokenizer(str(tiny_dir)), str(tmp_path / "adapter"), {"style": "x"})
    weights = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl"))
    assert weights == ["adapter_model.safetensors"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert not list(tmp_path.glob(".adapter*")), "export left its temp folder"

    # The same folder with its weights as a pickle that runs code: predict refuses it, and the code never runs
    evil = workdir / "evil_adapter"
    shutil.copytree(out, evil)
    (evil / "adapter_model.safetensors").unlink()
    (evil / "prompt_format.json").unlink()  # (a made-up prompt record; predict would refuse it first)
    marker = workdir / "PWNED"
    torch.save({"base_model.model.x.lora_A.weight": _Payload(marker)}, evil / "adapter_model.bin")
    (workdir / "in.txt").write_text("Shares rose.\n")
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict", "--config", "configs/smoke.yaml", "--data.predict_path", "in.txt", "--ckpt_path",
                  str(evil), *QUIET])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "evil_adapter: adapter weights are corrupted or not safe to load" in lines[0], err
    assert not marker.exists()

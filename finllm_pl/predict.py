"""Batch labeling: a streamed, crash-safe reader and writer around `FinLLM.predict_step`.

Reading: the input is read a chunk at a time (bounded memory for any file size); within a chunk rows are sorted
by length so batches carry little padding. Chunks grow: each rank's first holds FIRST_CHUNK_ROWS rows, each next
one twice as many, up to `chunk_rows` (`chunk_size`), so labeling starts once a small chunk is tokenized. Under
DDP, chunk c goes to rank c % world_size: no row is labeled twice and no sampler padding adds duplicates. Within
a rank, DataLoader workers take turns by chunk (worker w of W reads every row but tokenizes only the rank's
chunks w, w + W, ...): tokenizing is the CPU's share of labeling, and one process alone keeps an H100 waiting.
Their batches are taken as they come (not worker by worker in turn), so a worker busy tokenizing its next chunk
holds up no one while the others have batches. The workers start in the DataModule's setup, before the model
loads (PredictLoader.start): the first batches are ready when labeling starts.

Writing: each rank appends finished chunks, in input order (a chunk that finishes early waits for the ones
before it), to its part file and records its progress
(`<output>.part<rank>.json`: chunks and bytes done) after an fsync. A run killed at any point and restarted with
the same command truncates the part file to the recorded size and continues from the next chunk. Which chunks a
rank holds, and their sizes, follow from the number of processes and `chunk_rows`: a run with other ones cannot
continue them, and stops before the model loads with one line saying what to do (check_resumable). At the end the
part(s) become the output by a rename (or a merge, then a rename, on several ranks): the output file appears
complete or not at all.

Which job an output belongs to: beside a finished output, `<output>.job.json` records its input (path and content
fingerprint), labels, prompt format, kept fields and model (`model_identity`), and the output's own fingerprint.
The same command run again finds its job done and labels nothing; an output of another input (or a file predict
did not write) is replaced only with data.overwrite; the same input with another model, labels, prompt or content
is labeled again (plan_output).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from .batching import budget_batches, collate_prompts
from .errors import ConfigError
from .files import atomic_file, fsync_dir, write_atomic
from .prompts import PromptFormatter
from .records import DataError, iter_rows

PROGRESS_VERSION = 4  # 2: growing chunks (chunk_size); 3: from 256 rows; 4: ids are line numbers
FIRST_CHUNK_ROWS = 256


OUTPUT_KEYS = ("id", "label", "probs", "gold", "generated")  # what predict writes in each row itself


def check_keep_fields(fields: Optional[Sequence[str]]) -> list[str]:
    """data.keep_fields as a list, or a ConfigError: no name twice, none that the output row uses itself ("id"
    aside: it is the row's own id, which the output already carries)."""
    fields = list(fields or [])
    for f in fields:
        if fields.count(f) > 1:
            raise ConfigError(f"data.keep_fields: '{f}' is listed twice; list each field once")
        if f in OUTPUT_KEYS and f != "id":
            raise ConfigError(f"data.keep_fields: '{f}' is a key predict writes itself ({', '.join(OUTPUT_KEYS)}; "
                              "the input's label is written as gold); remove it from data.keep_fields")
    return fields


def chunk_size(c: int, chunk_rows: int, world: int) -> int:
    """Rows in chunk c of the input (chunk c goes to rank c % world): each rank's first chunk holds
    FIRST_CHUNK_ROWS rows, each next one twice as many, up to `chunk_rows`. Why: nothing is labeled before a
    whole chunk is tokenized; a first chunk of 16,384 rows kept an H100 idle for 3.6 s, 1,024 rows ~0.3 s, 256
    rows ~0.1 s, and the doubling keeps each next chunk tokenized before the GPU needs it (one worker tokenizes
    ~4,300 rows/s, the GPU labels ~3,000-3,500)."""
    return min(chunk_rows, FIRST_CHUNK_ROWS << min(c // world, 32))


def input_fingerprint(path: str) -> str:
    """Size + hash of the first and last MiB: cheap on huge files, and any edit of the input is caught."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:20]


def model_identity(hparams: dict[str, Any], ckpt_path: Optional[str], precision: Any) -> str:
    """A digest of what makes the labels: every model setting, the precision, and the weights' files (a .ckpt, an
    adapter folder, a local model folder) by content fingerprint. A finished output is "done" only for the same
    digest: any change labels again (a setting that only changes speed too: costly at worst, never stale)."""
    weights: dict[str, Any] = {}
    for key, path in (("ckpt_path", ckpt_path), ("adapter_path", hparams.get("adapter_path")),
                      ("model_name_or_path", hparams.get("model_name_or_path"))):
        if isinstance(path, str) and os.path.isfile(path):
            weights[key] = input_fingerprint(path)
        elif isinstance(path, str) and os.path.isdir(path):
            weights[key] = {f.name: input_fingerprint(str(f)) for f in sorted(Path(path).iterdir())
                            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".json")}
    blob = json.dumps({"hparams": dict(hparams), "ckpt_path": ckpt_path, "precision": str(precision),
                       "weights": weights}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_output(predict_path: str) -> str:
    """predictions/<input file name>.labels.jsonl: the input's extension stays in the name, so my.txt and my.csv
    never share an output. The folder is made here (a DataError when it cannot be)."""
    folder = "predictions"
    todo = "set data.predict_output to a file in a folder you can write to"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"data.predict_output is unset and its default folder {folder} is a file; {todo}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.predict_output is unset and its default folder {folder} cannot be made here "
                        f"({e.strerror}); {todo}") from None
    return os.path.join(folder, Path(predict_path).name + ".labels.jsonl")


def check_output_path(output: str, probe: bool = True) -> None:
    """A DataError (one line, naming data.predict_output) unless `output` can be written: its folder exists and
    (probe) takes a new file, tried for real: permission bits do not tell (root, read-only mounts, /sys)."""
    key, shown = "data.predict_output", os.path.dirname(output) or "."
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise DataError(f"{key}={output}: is a folder; set {key} to a file path")
    if not os.path.exists(folder):
        raise DataError(f"{key}={output}: folder {shown} does not exist; create it or set {key}")
    if not os.path.isdir(folder):
        raise DataError(f"{key}={output}: {shown} is a file, not a folder; set {key} to a file in a folder")
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise DataError(f"{key}={output}: folder {shown} is not writable ({e.strerror}); set {key} elsewhere "
                            "(a file in a folder you can write to)") from None
        os.close(fd)
        os.unlink(tmp)


def job_path(output: str) -> Path:
    return Path(f"{output}.job.json")


def read_job(output: str) -> Optional[dict[str, Any]]:
    try:
        job = json.loads(job_path(output).read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def write_job(output: str, job: dict[str, Any]) -> None:
    """The record of the job a finished output belongs to, with the output's fingerprint (a later edit of the
    output is seen)."""
    write_atomic(job_path(output), json.dumps({**job, "output": input_fingerprint(output)}, indent=1) + "\n")


RESUME_ONLY = ("world", "chunk_rows")  # how a job is split over ranks and chunks, not what its output holds
_WHAT = {"version": "output format version", "input": "input content", "input_path": "input file",
         "labels": "label set", "prompt": "prompt format", "keep_fields": "data.keep_fields",
         "model": "model or model settings"}


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def count_rows(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n


def plan_output(output: str, expect: dict[str, Any], input_path: str, overwrite: bool) -> tuple[str, Optional[str]]:
    """What to do about `output` before labeling (nothing is written here):
    ("done", line): it holds this very job's finished labels (same input file and content, labels, prompt, kept
    fields, model; the output unchanged since): label nothing;
    ("label", note or None): label; the note says what an existing output is replaced for;
    a DataError: an interrupted run of this job split otherwise is there (check_resumable), or the output holds
    another input's labels, or is a file predict did not write, and data.overwrite is off."""
    if finished_earlier(output, expect) is not None:
        return "label", None  # (the writer completes it without labeling)
    job = {"input_path": os.path.realpath(input_path), **expect}
    side = read_job(output) if os.path.exists(output) else None
    differ = [k for k in job if k not in RESUME_ONLY and side.get(k) != job[k]] if side is not None else []
    if side is not None and not differ and side.get("output") == input_fingerprint(output):
        return "done", (f"{output}: already labeled ({count_rows(output)} rows of {input_path}, same labels, "
                        "prompt and model); nothing to do (delete it to label again)")
    check_resumable(output, expect)  # (after "done": progress files beside a finished output hold nothing to resume)
    if not os.path.exists(output):
        return "label", None
    if side is not None:
        if side.get("input_path") == job["input_path"] or side.get("input") == job["input"]:
            if not differ:
                return "label", f"{output}: changed since it was labeled; labeling it again"
            return "label", (f"{output}: labeled before with another {' and '.join(_WHAT.get(k, k) for k in differ)}; "
                             "labeling it again (the new labels replace it when done)")
    todo = "set data.predict_output to another file, or data.overwrite true to replace it"
    other = _shown(side["input_path"]) if side is not None and side.get("input_path") else None
    if overwrite:
        return "label", f"{output}: replacing the labels of {other or 'a file predict did not write'} (data.overwrite)"
    if other is None:
        raise DataError(f"{output}: exists and was not written by predict (no {job_path(output)} beside it); {todo}")
    raise DataError(f"{output}: holds the labels of {other}, not of {input_path}; {todo}")


def check_input(path: str, instruction: str, text_column: str, keep_fields: Sequence[str],
                labels: Sequence[str]) -> Optional[int]:
    """Read (and check) every row once before any is labeled: a bad row at line 900,000 stops the job now, with
    nothing written, instead of hours later beside a half-labeled output. Returns the line of the first gold label
    that is not in `labels` (such rows are left out of the metrics; the summary line says so), or None."""
    first = None
    for row in iter_rows(path, instruction=instruction, need_output=False, text_column=text_column,
                         keep_fields=keep_fields):
        if first is None and row.output is not None and row.output not in labels:
            first = row.line
    return first


def part_path(output: str, rank: int) -> Path:
    return Path(f"{output}.part{rank}")


def read_progress(output: str, rank: int) -> Optional[dict[str, Any]]:
    """What rank `rank` recorded of its part file (the job it belongs to, chunks, bytes, rows), or None."""
    prog = Path(f"{part_path(output, rank)}.json")
    return json.loads(prog.read_text()) if prog.exists() else None


def same_job(state: dict[str, Any], expect: dict[str, Any]) -> bool:
    """Whether recorded progress belongs to the job `expect` describes, however that job was split (RESUME_ONLY)."""
    return all(state.get(k) == v for k, v in expect.items() if k not in RESUME_ONLY)


def load_progress(output: str, rank: int, expect: dict[str, Any]) -> dict[str, Any]:
    """The recorded progress of this rank if it belongs to the same job (input, labels, ranks), else a fresh start."""
    state, part = read_progress(output, rank), part_path(output, rank)
    if state is not None and part.exists():
        if all(state.get(k) == v for k, v in expect.items()) and part.stat().st_size >= state["bytes"]:
            return state
    return {**expect, "chunks": 0, "bytes": 0, "rows": 0}


def check_resumable(output: str, expect: dict[str, Any]) -> None:
    """A DataError (one line: what to do) when a part file holds this same job's labels recorded under another
    split (other RESUME_ONLY values): rank r holds chunks r, r + world, ... of sizes that follow from the world size
    and chunk_rows (chunk_size), so this run could not continue them, and starting over would throw away what they
    hold without asking. (Progress of another job is no one's: that rank starts over, as load_progress says.)"""
    name = re.compile(re.escape(Path(output).name) + r"\.part(\d+)\.json")
    ranks = sorted(int(m.group(1)) for f in os.listdir(Path(output).parent) if (m := name.fullmatch(f)))
    states = [s for r in ranks if (s := read_progress(output, r)) is not None and part_path(output, r).exists()]
    other = [s for s in states if same_job(s, expect) and any(s.get(k) != expect[k] for k in RESUME_ONLY)]
    if not other:
        return
    differ = [k for k in RESUME_ONLY if other[0].get(k) != expect[k]]
    split = [s for s in other if all(s.get(k) == other[0].get(k) for k in RESUME_ONLY)]  # (one earlier run's)
    old, new = _split_words(other[0], differ), _split_words(expect, differ)
    raise DataError(f"{output}: an interrupted run of this job labeled {sum(s['rows'] for s in split)} rows with "
                    f"{old}, this run has {new}; a job resumes only as it was split over processes and chunks: run it "
                    f"again with {old} to resume it, or delete {output}.part* to label it from the start")


def _split_words(state: dict[str, Any], keys: Sequence[str]) -> str:
    """How a job is split, in the words of its settings: "2 processes and data.predict_chunk_rows 4096"."""
    words = {"world": lambda n: f"{n} process" + ("" if n == 1 else "es"),
             "chunk_rows": lambda n: f"data.predict_chunk_rows {n}"}
    return " and ".join(words[k](state.get(k)) for k in keys)


def finished_earlier(output: str, expect: dict[str, Any]) -> Optional[int]:
    """A run of this same job that was killed after its output was in place but before it removed its progress
    files: every rank's progress matches the job, no part file is left, and the output holds exactly the bytes
    they recorded. Then there is nothing to label again, only the progress files to remove: returns how many ranks
    that run had (their progress files), else None. That run may have been split otherwise than this one: the
    output it left is the same whatever the split."""
    first = read_progress(output, 0)
    if not os.path.isfile(output) or first is None or not same_job(first, expect):
        return None
    total = 0
    for r in range(first["world"]):
        state = read_progress(output, r)
        if part_path(output, r).exists() or state is None or not same_job(state, expect) or \
                any(state.get(k) != first.get(k) for k in RESUME_ONLY):
            return None
        total += state["bytes"]
    return first["world"] if os.path.getsize(output) == total else None


def _write_progress(output: str, rank: int, state: dict[str, Any]) -> None:
    write_atomic(f"{part_path(output, rank)}.json", json.dumps(state))


class PredictStream(IterableDataset):
    """Yields collated prompt batches with their rows' (index, id, gold) for this rank, chunk by chunk (and, with
    keep_fields, the rows' kept input fields as batch["fields"])."""

    def __init__(self, path: str, formatter: PromptFormatter, label_ids: list[list[int]], instruction: str,
                 text_column: str, batch_size: int, chunk_rows: int, max_length: int, labels: Sequence[str],
                 rank: int = 0, world_size: int = 1, start_chunk: int = 0, max_tokens: Optional[int] = None,
                 keep_fields: Sequence[str] = ()) -> None:
        self.path, self.formatter, self.label_ids = path, formatter, label_ids
        self.instruction, self.text_column, self.labels = instruction, text_column, list(labels)
        self.batch_size, self.chunk_rows, self.max_length = batch_size, chunk_rows, max_length
        self.rank, self.world_size, self.start_chunk = rank, world_size, start_chunk
        self.max_tokens, self.keep_fields = max_tokens, list(keep_fields)
        self.created = time.perf_counter()
        self.asked: Optional[float] = None  # when the loop asked for its batches (PredictionWriter: the wait from it)
        self.started: Optional[Iterator] = None  # an iterator made ahead of the loop (PredictLoader.start)
        self.longest_label = max(labels, key=lambda s: len(formatter.encode_answer(s)))

    def __getstate__(self) -> dict[str, Any]:  # (workers started by spawn get the stream without any iterator)
        return {**self.__dict__, "started": None}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = iter_rows(self.path, instruction=self.instruction, need_output=False, text_column=self.text_column,
                         keep_fields=self.keep_fields)
        pad = self.formatter.tokenizer.pad_token_id
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        c = -1
        while True:
            chunk = list(islice(rows, chunk_size(c + 1, self.chunk_rows, self.world_size)))
            if not chunk:
                return
            c += 1
            mine = c // self.world_size  # the rank's own chunk number
            if c % self.world_size != self.rank or mine < self.start_chunk or mine % workers != worker:
                continue
            # Fit prompt + the longest label into max_length by cutting the input text, as training does.
            prompts = self.formatter.encode_prompts([(r.instruction, r.input) for r in chunk], self.longest_label,
                                                    self.max_length)
            order = sorted(range(len(chunk)), key=lambda i: -len(prompts[i]))
            for idx in budget_batches(order, [len(p) for p in prompts], self.batch_size, self.max_tokens):
                batch = collate_prompts([prompts[i] for i in idx], pad, self.label_ids)
                batch["rows"] = [(chunk[i].index, chunk[i].id, chunk[i].output) for i in idx]
                if self.keep_fields:
                    batch["fields"] = [chunk[i].fields for i in idx]
                batch["chunk"] = (c, len(chunk))
                yield batch


class PredictLoader(DataLoader):
    """predict's DataLoader. `start()` makes its iterator ahead of the loop: with workers, they fork and begin
    reading and tokenizing then. The loop's first iter() takes that iterator, from the stream: Lightning makes its
    own loader for predict from the hook's one's arguments, and they share the stream."""

    def start(self) -> None:
        self.dataset.started = super().__iter__()

    def __iter__(self):
        stream = self.dataset
        stream.asked = time.perf_counter()
        started, stream.started = stream.started, None
        return started if started is not None else super().__iter__()


def parse_generated(text: str, labels: Sequence[str]) -> Optional[str]:
    """The label a free-text answer names, or None. Reasoning (`<think>...</think>`) is dropped first; an
    answer naming no label, or several, is unparsed (never silently mapped to 'neutral')."""
    text = re.sub(r"<think>.*?(</think>|$)", " ", text, flags=re.S).strip().lower()
    found = [lab for lab in labels if re.search(rf"\b{re.escape(lab.lower())}\b", text)]
    return found[0] if len(found) == 1 else None


class PredictionWriter(BasePredictionWriter):
    """Writes one JSON line per input row, in input order: id, the kept input fields (data.keep_fields), label,
    probabilities, gold (when known)."""

    def __init__(self, output: str, labels: Sequence[str], expect: dict[str, Any],
                 input_path: Optional[str] = None, outside_at: Optional[int] = None) -> None:
        super().__init__(write_interval="batch")
        self.output, self.labels, self.expect = output, list(labels), expect
        # what the finished output's job record says (write_job)
        self.job = {"input_path": os.path.realpath(input_path) if input_path else None, **expect}
        self.outside_at = outside_at  # the input line of the first gold label not in `labels` (check_input)
        self.pending: dict[int, dict[str, Any]] = {}  # chunk -> {"size", "rows": {index: line}}
        self.report: Optional[dict[str, Any]] = None  # counts and metrics of the finished output (rank 0)
        self.done_before: Optional[int] = None  # ranks of an earlier run that completed the output (finished_earlier)
        self.speed: Optional[dict[str, float]] = None  # rows this process labeled in this run, and in how long
        self.first_batch_s: Optional[float] = None  # from the stream's creation to the first batch, read and tokenized
        self.in_flight = None  # the last batch's (prediction, chunk): written when the next one is under way

    def on_predict_start(self, trainer, pl_module) -> None:
        check_output_path(self.output)  # (the CLI checked it before loading anything; this is for direct use)
        self.rank, self.world = trainer.global_rank, trainer.world_size
        if self.world != self.expect["world"]:  # (the chunks this run reads and writes would not be the job's)
            raise RuntimeError(f"predict planned its job for {self.expect['world']} process(es) and runs on "
                               f"{self.world}")
        self.t0, self.labeled, self.in_flight = time.perf_counter(), 0, None
        # Lightning fetches the first batch of a stream before this hook: the wait for it (reading and tokenizing
        # the first chunks, the GPU idle) is measured from when the loop asked for it (or the stream's creation)
        # and reported apart. (Workers started ahead of the loop have read and tokenized during model loading.)
        stream = getattr(trainer.predict_dataloaders, "dataset", None)
        asked = getattr(stream, "asked", None) or getattr(stream, "created", None)
        self.first_batch_s = self.t0 - asked if asked is not None else None
        self.finisher = Finisher.for_run(trainer, pl_module, self.labels)
        self.done_before = finished_earlier(self.output, self.expect)  # the data yields nothing then
        if self.done_before is not None:
            return
        self.state = load_progress(self.output, self.rank, self.expect)
        part = part_path(self.output, self.rank)
        self.file = open(part, "r+b" if part.exists() else "wb")
        self.file.truncate(self.state["bytes"])  # drop whatever a killed run wrote after its last record
        self.file.seek(self.state["bytes"])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        # One batch behind: this batch's scores may still be on their way from the GPU (predict_step does not
        # wait for them), the previous batch's have landed, and writing them overlaps this batch's scoring.
        if "fields" in batch:  # (predict_step passes the rows on, not the rest of the batch)
            prediction["fields"] = batch["fields"]
        previous, self.in_flight = self.in_flight, (prediction, batch["chunk"])
        if previous is not None:
            self._write(*previous)

    def _write(self, prediction: dict[str, Any], chunk: tuple[int, int]) -> None:
        if "ready" in prediction:
            prediction["ready"].synchronize()
        c, size = chunk
        self.labeled += len(prediction["rows"])
        slot = self.pending.setdefault(c, {"size": size, "rows": {}})
        # one tolist() for the batch: indexing a tensor row by row costs more than the JSON
        probs = torch.softmax(prediction["scores"], -1).tolist() if "scores" in prediction else None
        fields = prediction.get("fields")
        for j, (index, rid, gold) in enumerate(prediction["rows"]):
            rec: dict[str, Any] = {"id": rid}
            if fields is not None:
                rec.update(fields[j])
            if probs is not None:
                rec.update(scored_fields(probs[j], self.labels))
            else:
                rec["label"] = parse_generated(prediction["texts"][j], self.labels)
                rec["generated"] = prediction["texts"][j]
            if gold is not None:
                rec["gold"] = gold
            slot["rows"][index] = json.dumps(rec, ensure_ascii=False) + "\n"
        # Chunks go to the part file in input order: one that a worker finished early waits for those before it.
        while (nxt := self.state["chunks"] * self.world + self.rank) in self.pending and \
                len(self.pending[nxt]["rows"]) == self.pending[nxt]["size"]:
            self._flush(nxt)

    def _flush(self, c: int) -> None:
        rows = self.pending.pop(c)["rows"]
        data = "".join(rows[i] for i in sorted(rows)).encode("utf-8")
        self.file.write(data)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.state.update(chunks=self.state["chunks"] + 1, bytes=self.state["bytes"] + len(data),
                          rows=self.state["rows"] + len(rows))
        _write_progress(self.output, self.rank, self.state)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A failed run keeps what it recorded (the same command resumes it) and removes a part it never used."""
        file = getattr(self, "file", None)
        if file is None or file.closed:
            return
        file.close()
        if self.state["bytes"] == 0:
            part_path(self.output, self.rank).unlink(missing_ok=True)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.in_flight is not None:
            self._write(*self.in_flight)
            self.in_flight = None
        if self.done_before is None:
            self.file.close()
        if self.pending:
            raise RuntimeError(f"prediction ended with unfinished chunks {sorted(self.pending)}")
        seconds = time.perf_counter() - self.t0
        self.speed = {"rows": self.labeled, "seconds": seconds, "rows_s": self.labeled / max(seconds, 1e-9),
                      "first_batch_s": self.first_batch_s}
        trainer.strategy.barrier()
        if self.rank == 0:
            if self.done_before is not None:
                write_job(self.output, self.job)
                _remove_progress(self.output, self.done_before)
            else:
                finish_output(self.output, self.world, self.expect["chunk_rows"], self.job, self.finisher)
            self.report = prediction_report(self.output, self.labels)
            _announce(self.output, self.report, self.speed, self.outside_at, self.labels, self.finisher)
        trainer.strategy.barrier()


def finish_output(output: str, world: int, chunk_rows: int, job: Optional[dict[str, Any]] = None,
                  finisher: Optional["Finisher"] = None) -> None:
    """Turn the rank part files into the output: chunk c (`chunk_size` rows) sits in part c % world (one part:
    renamed), through `finisher` when it rewrites the rows (label shift), then its review file, the job record
    (`job`, when given) and, last, the removal of the progress files."""
    parts = [part_path(output, r) for r in range(world)]
    merged = parts[0]
    if world > 1:
        merged = Path(f"{output}.merged")
        files = [open(p, "rb") for p in parts]
        with atomic_file(merged, "wb") as out:
            c = 0
            while True:
                lines = list(islice(files[c % world], chunk_size(c, chunk_rows, world)))
                if not lines:
                    break
                out.writelines(lines)
                c += 1
        for f in files:
            f.close()
    if finisher is not None and finisher.rewrites:
        finisher.rewrite(merged, output)
        merged.unlink()
    else:
        os.replace(merged, output)
        fsync_dir(Path(output).parent)
    for p in parts:
        p.unlink(missing_ok=True)
    if finisher is not None:
        finisher.review(output)
    else:
        Path(f"{output}.review.jsonl").unlink(missing_ok=True)  # (one an earlier job of this output left)
    if job is not None:
        write_job(output, job)
    _remove_progress(output, world)  # a kill before this line leaves a state finished_earlier() recognises


def scored_fields(p: Sequence[float], labels: Sequence[str]) -> dict[str, Any]:
    """An output row's label (the first of equals, as argmax), probabilities, confidence (the top probability)
    and margin (top minus second: how close the call was)."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    return {"label": labels[order[0]], "probs": {lab: round(x, 6) for lab, x in zip(labels, p)},
            "confidence": round(p[order[0]], 6), "margin": round(p[order[0]] - p[order[1]], 6) if len(p) > 1 else 1.0}


class Finisher:
    """What predict does to the finished rows (rank 0): label-shift adaptation (model.prior_shift: every row's
    probabilities re-weighted to the label mix of this file, estimated by EM or given; the model's own are kept as
    probs_model) and the review queue (data.review_below: the rows under that confidence also go to
    <output>.review.jsonl; the expected accuracy of each side is its mean calibrated confidence)."""

    def __init__(self, labels: Sequence[str], prior_shift: Any = "none", train_prior: Optional[Sequence[float]] = None,
                 review_below: Optional[float] = None, calibrated: bool = False) -> None:
        self.labels, self.prior_shift, self.train_prior = list(labels), prior_shift, train_prior
        self.review_below, self.calibrated = review_below, calibrated
        self.rewrites = prior_shift not in (None, "none")
        self.shift: Optional[dict[str, Any]] = None
        self.reviewed: Optional[dict[str, Any]] = None

    @classmethod
    def for_run(cls, trainer, pl_module, labels: Sequence[str]) -> Optional["Finisher"]:
        hp = getattr(pl_module, "hparams", {})
        dm = getattr(trainer, "datamodule", None)
        shift = hp.get("prior_shift", "none") if hasattr(hp, "get") else "none"
        review = getattr(dm, "hparams", {}).get("review_below") if dm is not None else None
        if shift in (None, "none") and review is None:
            return None
        if hp.get("predict_mode", "score") != "score":
            raise ConfigError("model.prior_shift and data.review_below need label probabilities: use "
                              "model.predict_mode score")
        calibration = getattr(pl_module, "calibration", None)
        prior = calibration.prior if calibration is not None else None
        if shift not in (None, "none") and prior is None:
            raise ConfigError("model.prior_shift re-weights calibrated probabilities from the prior they were "
                              "calibrated under, and this model has no calibration.json with one: fit with a "
                              "validation set (model.calibration temperature), or run `calibrate`")
        return cls(labels, shift, prior, review, calibrated=calibration is not None)

    def rewrite(self, src: Path, output: str) -> None:
        from .prior_shift import adjust_to_prior, em_prior

        rows = [json.loads(line) for line in open(src, encoding="utf-8")]
        probs = torch.tensor([[r["probs"][k] for k in self.labels] for r in rows], dtype=torch.float64)
        probs = probs / probs.sum(-1, keepdim=True)  # (the file rounds to 6 decimals)
        train = torch.tensor(self.train_prior, dtype=torch.float64)
        if self.prior_shift == "em":
            prior, adjusted, iterations = em_prior(probs, train)
        else:
            prior, iterations = torch.tensor(self.prior_shift, dtype=torch.float64), 0
            adjusted = adjust_to_prior(probs, train, prior)
        changed = 0
        with atomic_file(output, "w", encoding="utf-8") as out:
            for r, p in zip(rows, adjusted.tolist()):
                before = r["label"]
                r["probs_model"] = r["probs"]
                r.update(scored_fields(p, self.labels))
                changed += r["label"] != before
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.shift = {"how": "em" if self.prior_shift == "em" else "given", "prior": prior.tolist(),
                      "training_prior": train.tolist(), "iterations": iterations, "labels_changed": changed}

    def review(self, output: str) -> None:
        path = Path(f"{output}.review.jsonl")
        if self.review_below is None:
            path.unlink(missing_ok=True)  # (one an earlier job of this output left)
            return
        below = above = n_below = n_above = right_below = right_above = 0
        gold = True
        with open(output, encoding="utf-8") as f, atomic_file(path, "w", encoding="utf-8") as out:
            for line in f:
                rec = json.loads(line)
                under = rec["confidence"] < self.review_below
                if under:
                    out.write(line)
                    n_below, below = n_below + 1, below + rec["confidence"]
                    right_below += rec.get("gold") == rec["label"]
                else:
                    n_above, above = n_above + 1, above + rec["confidence"]
                    right_above += rec.get("gold") == rec["label"]
                gold = gold and "gold" in rec
        self.reviewed = {"path": str(path), "rows": n_below, "threshold": self.review_below, "rows_above": n_above,
                         "expected_accuracy_below": below / n_below if n_below else None,
                         "expected_accuracy_above": above / n_above if n_above else None}
        if gold:
            self.reviewed.update(accuracy_below=right_below / n_below if n_below else None,
                                 accuracy_above=right_above / n_above if n_above else None)


def _remove_progress(output: str, world: int) -> None:
    for r in range(world):
        Path(f"{part_path(output, r)}.json").unlink(missing_ok=True)


def prediction_report(output: str, labels: Sequence[str], block: int = 65536) -> dict[str, Any]:
    """Counts of a finished output and, when its rows carry gold labels, accuracy / F1 / confusion (torchmetrics).

    Streamed in blocks, so it costs no memory on a file of millions of rows. An unparsed generated answer is a
    wrong answer: it is predicted as an extra "(unparsed)" class, which lowers accuracy and the recall of the
    row's gold class; macro- and weighted-F1 average over the real labels only.
    """
    from .metrics import label_metrics, summarize

    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    metrics = label_metrics(k + 1, sync=False)  # rank 0 alone reads the merged file: no collective
    counts = {"rows": 0, "unparsed": 0, "without_gold": 0, "gold_outside_labels": 0}
    preds: list[int] = []
    golds: list[int] = []

    def update() -> None:
        if preds:
            metrics.update(torch.tensor(preds), torch.tensor(golds))
            preds.clear()
            golds.clear()

    scored = 0
    with open(output, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            counts["rows"] += 1
            counts["unparsed"] += rec["label"] is None
            gold = rec.get("gold")
            if gold is None:
                counts["without_gold"] += 1
            elif gold not in index:
                counts["gold_outside_labels"] += 1
            else:
                preds.append(index.get(rec["label"], k))
                golds.append(index[gold])
                scored += 1
                if len(preds) >= block:
                    update()
    update()
    if not scored:
        return {"output": output, **counts}
    values = metrics.compute()
    report = summarize(values, labels + ["(unparsed)"])
    cm = report["confusion_matrix"]
    # torchmetrics averaged over k + 1 classes; the extra class is not a label: average over the real ones
    # (macro skips classes with no gold and no prediction, as torchmetrics does).
    f1 = [report["per_class"][lab]["f1"] for lab in labels]
    support = [sum(cm[i]) for i in range(k)]
    present = [i for i in range(k) if support[i] or sum(row[i] for row in cm)]
    report["f1_macro"] = sum(f1[i] for i in present) / max(len(present), 1)
    report["f1_weighted"] = sum(f * s for f, s in zip(f1, support)) / max(sum(support), 1)
    if not counts["unparsed"]:  # score mode, or generation that always named a label: a plain k x k report
        del report["per_class"]["(unparsed)"]
        report["labels"] = labels
        report["confusion_matrix"] = [row[:k] for row in cm[:k]]
    else:
        del report["per_class"]["(unparsed)"]
    return {"output": output, **counts, **report}


def _announce(output: str, report: dict[str, Any], speed: Optional[dict[str, float]] = None,
              outside_at: Optional[int] = None, labels: Sequence[str] = (), finisher: Optional[Finisher] = None) -> None:
    """One line on stderr; with gold labels, the metrics as JSON + Markdown + PNG beside the output. Gold labels
    outside the label set are said there too (count, first line): they are left out of the metrics."""
    from .metrics import write_report

    line = f"labeled {report['rows']} rows -> {output}"
    if speed and speed["rows"]:
        line += f" ({speed['rows']} by this process in {speed['seconds']:.1f} s, {speed['rows_s']:,.0f} rows/s"
        if speed.get("first_batch_s") is not None:
            line += f", after {speed['first_batch_s']:.1f} s reading and tokenizing the first batch"
        line += ")"
    if report["unparsed"]:
        line += f"; {report['unparsed']} generated answers named no single label (label null)"
    if finisher is not None and finisher.shift is not None:
        sh = finisher.shift
        mix = lambda q: "/".join(f"{x:.2f}" for x in q)  # noqa: E731
        line += (f"; label shift ({'estimated by EM' if sh['how'] == 'em' else 'given'}): prior {mix(sh['prior'])} "
                 f"vs {mix(sh['training_prior'])} calibrated on ({'/'.join(labels)}), {sh['labels_changed']} labels "
                 "changed (the model's own probabilities: probs_model)")
    if finisher is not None and finisher.reviewed is not None:
        rv = finisher.reviewed
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        line += (f"; {rv['rows']} rows under confidence {rv['threshold']:g} -> {rv['path']} (expected accuracy "
                 f"{fmt(rv['expected_accuracy_below'])} there, {fmt(rv['expected_accuracy_above'])} above"
                 + ("" if finisher.calibrated else ", from uncalibrated probabilities") + ")")
    if report["gold_outside_labels"]:
        n = report["gold_outside_labels"]
        line += (f"; {n} gold label{' is' if n == 1 else 's are'} not in {'/'.join(labels)}"
                 + (f" (first at line {outside_at})" if outside_at is not None else "")
                 + (": those rows are left out of the metrics" if "accuracy" in report
                    else ": no metrics are written (set data.labels to the file's labels)"))
    stem = Path(output).name.removesuffix(".jsonl")
    if "accuracy" not in report:  # metrics left beside the output by an earlier job describe labels no longer there
        for p in (f"{stem}.metrics.json", f"{stem}.metrics.md", f"{stem}.metrics_confusion.png"):
            (Path(output).parent / p).unlink(missing_ok=True)
    else:
        paths = write_report(report, str(Path(output).parent), stem=f"{stem}.metrics", title=f"Labels of {output}")
        line += (f"; against the {report['support']} gold labels: accuracy {report['accuracy']:.4f}, macro-F1 "
                 f"{report['f1_macro']:.4f}, weighted-F1 {report['f1_weighted']:.4f} -> {paths[1]}")
    print(line, file=sys.stderr)

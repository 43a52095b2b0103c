"""InstructionDataModule: JSONL rows -> tokenized, cached, length-grouped, resumable batches.

Flow: `records.iter_rows` checks every row (errors name file:line) -> `PromptFormatter.encode_example` tokenizes
prompt and answer apart (prompt labels -100) -> `datasets` caches the result on disk, keyed by the file's bytes,
the tokenizer, the prompt format and max_length, so a second run starts at once -> `LengthGroupedBatchSampler`
makes batches of similar length (little compute wasted on padding), deterministically for (seed, epoch), shards
them across ranks, and resumes mid-epoch from the checkpoint without repeating or skipping a batch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from .batching import PlainCollate, budget_batches, collate_eval
from .errors import ConfigError, DataError
from .files import new_dir
from .prompts import DEFAULT_INSTRUCTION, DEFAULT_LABELS, PromptFormatter, PromptStyle, ThinkPolicy
from .records import iter_rows

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("FINLLM_CACHE", Path.home() / ".cache" / "finllm_pl")) / "tokenized"


# ---------------------------------------------------------------------------------------------------------
# Tokenization with an on-disk cache
# ---------------------------------------------------------------------------------------------------------
def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenize_file(
    path: str,
    formatter: PromptFormatter,
    max_length: int,
    instruction: str,
    labels: Optional[Sequence[str]],
    cache_dir: Path,
    text_column: str = "text",
    label_column: str = "label",
):
    """Tokenized rows of `path` as a `datasets.Dataset` (input_ids, labels, prompt_len, length, gold, truncated)."""
    import datasets

    rows = list(iter_rows(path, instruction=instruction, need_output=True, labels=labels,
                          text_column=text_column, label_column=label_column))  # checks every row first
    key_src = "|".join([CACHE_VERSION, _file_digest(path), formatter.fingerprint(), str(max_length), instruction,
                        repr(list(labels) if labels else None), text_column, label_column])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    target = cache_dir / f"{Path(path).stem}-{key}"
    if (target / "dataset_info.json").exists():
        return datasets.load_from_disk(str(target))

    label_index = {label: i for i, label in enumerate(labels or [])}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "prompt_len", "length", "gold", "truncated")}
        for ins, inp, ans in zip(batch["instruction"], batch["input"], batch["output"]):
            ids, lab, plen, cut = formatter.encode_example(ins, inp, ans, max_length)
            out["input_ids"].append(ids)
            out["labels"].append(lab)
            out["prompt_len"].append(plen)
            out["length"].append(len(ids))
            out["gold"].append(label_index.get(ans, -1))
            out["truncated"].append(cut)
        return out

    raw = datasets.Dataset.from_dict({
        "instruction": [r.instruction for r in rows],
        "input": [r.input for r in rows],
        "output": [r.output for r in rows],
    })
    ds = raw.map(encode, batched=True, batch_size=1000, remove_columns=raw.column_names,
                 new_fingerprint=key, desc=f"tokenizing {Path(path).name}")
    with new_dir(target) as tmp:  # a crash never leaves a half-written cache entry; another rank may win the race
        ds.save_to_disk(str(tmp))
    return datasets.load_from_disk(str(target))


def stratified_split(keys: Sequence[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, stratified (train, val) index lists; every class keeps about `fraction` of its rows in val."""
    by_key: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    g = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for k in sorted(by_key, key=str):
        idx = by_key[k]
        perm = torch.randperm(len(idx), generator=g).tolist()
        val += [idx[p] for p in perm[: int(round(fraction * len(idx)))]]
    val_set = set(val)
    return [i for i in range(len(keys)) if i not in val_set], sorted(val)


# ---------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------
class SeededOrder(Sampler[int]):
    """The epoch's row order: a permutation seeded by (seed, epoch). Lightning calls `set_epoch` on it each epoch
    (it looks for `batch_sampler.sampler.set_epoch`), so every epoch is shuffled differently, reproducibly."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator()).tolist() if self.shuffle else range(self.n))

    def __len__(self) -> int:
        return self.n


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar-length rows, deterministic for (seed, epoch), sharded over ranks.

    The epoch's order is cut into "mega-batches" of `mega` batches, sorted by length inside each, then cut into
    batches whose order is shuffled again: batches are nearly uniform in length, yet every epoch differs.
    Resume: `resume_at(epoch, batches_done)` makes that epoch's iteration skip the batches already trained on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, rank: int = 0, world_size: int = 1, mega: int = 64) -> None:
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.sampler = SeededOrder(len(self.lengths), seed, shuffle)
        self.batch_size, self.shuffle, self.group_by_length = batch_size, shuffle, group_by_length
        self.rank, self.world_size, self.mega = rank, world_size, mega
        self._resume: Optional[tuple[int, int]] = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done)

    def _global_batches(self) -> list[list[int]]:
        order = list(self.sampler)
        if self.group_by_length:
            span = self.batch_size * self.mega
            order = [i for s in range(0, len(order), span)
                     for i in sorted(order[s:s + span], key=lambda j: -self.lengths[j])]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.shuffle:
            g = self.sampler.generator()
            g.manual_seed(g.initial_seed() + 1)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        per_rank = len(self)
        # Every rank must see the same number of batches (DDP): the last few repeat from the start.
        batches += [batches[k % len(batches)] for k in range(per_rank * self.world_size - len(batches))]
        mine = batches[self.rank::self.world_size]
        skip = self._resume[1] if self._resume and self._resume[0] == self.sampler.epoch else 0
        yield from mine[skip:]

    def __len__(self) -> int:
        n_batches = -(-len(self.lengths) // self.batch_size)
        return -(-n_batches // self.world_size)


class EvalBatchSampler(LengthGroupedBatchSampler):
    """Validation batches, in a fixed length-grouped order, sharded over ranks so that every row counts once.

    Batch b of the 1-process order goes to rank b % world_size, so each row is scored in the very batch (same
    padding) it has on one process. Every rank must run the same number of batches (a rank with none would skip
    the loop and leave the others waiting in the epoch-end reduction), so the list is padded with repeated
    batches as in training, but here each row comes as `(index, counted)` and the repeats have counted=False:
    `collate_eval` masks their loss labels and gold, so loss, token count and metrics see every row exactly once.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_by_length: bool = True, rank: int = 0,
                 world_size: int = 1, max_tokens: Optional[int] = None) -> None:
        super().__init__(lengths, batch_size, shuffle=False, group_by_length=group_by_length, rank=rank,
                         world_size=world_size)
        self.max_tokens = max_tokens
        self._batches = self._global_batches()

    def _global_batches(self) -> list[list[int]]:
        if self.max_tokens is None:
            return super()._global_batches()
        order = range(len(self.lengths))
        if self.group_by_length:
            order = sorted(order, key=lambda j: -self.lengths[j])  # ties keep file order
        return budget_batches(order, self.lengths, self.batch_size, self.max_tokens)

    def __len__(self) -> int:
        return -(-len(self._batches) // self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        batches = [[(i, True) for i in b] for b in self._batches]
        extra = len(self) * self.world_size - len(batches)
        batches += [[(i, False) for i, _ in batches[k % len(batches)]] for k in range(extra)]
        yield from batches[self.rank::self.world_size]


class CountedRows(torch.utils.data.Dataset):
    """A dataset read with `(index, counted)` keys (from EvalBatchSampler): rows come back with a `counted` flag."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, keys: list[tuple[int, bool]]) -> list[dict]:
        cols = self.ds[[i for i, _ in keys]]
        return [{**{k: v[j] for k, v in cols.items()}, "counted": c} for j, (_, c) in enumerate(keys)]


PROMPT_WORKER_SWITCH_S = 0.0005  # Python's GIL switch interval in predict's workers (its default: 0.005 s)


def prompt_worker_init(worker_id: int) -> None:
    """predict's DataLoader workers hand the GIL over 10x sooner than Python's default. Why: a batch a worker
    has made goes to the main process through the worker's queue thread and, for each tensor, a round trip with
    the worker's resource-sharing thread (the tensor's shared-memory file descriptor); each step needs the GIL,
    which the worker's main thread holds while it reads and tokenizes its next chunk, and a waiting thread gets
    it only every switch interval. On an H100 host (16 cores), batches reached the main process 100-300 ms after
    the worker had them, and the GPU waited ~0.1 s for the job's second batch; with this, the DataLoader alone
    handed over the second batch 71 ms after the first instead of 194 ms, and in 4 + 4 jobs of 13,173 rows the
    GPU idled 68-90 ms instead of 126-189 ms in the job's first second (results/gpu/
    predict_rows_worker_switch_interval.json; numpy arrays instead of tensors, which skip the descriptors, lost:
    predict_rows_numpy_transfer_experiment.json)."""
    sys.setswitchinterval(PROMPT_WORKER_SWITCH_S)


# ---------------------------------------------------------------------------------------------------------
# The DataModule
# ---------------------------------------------------------------------------------------------------------
class InstructionDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_path: Optional[str] = "data/sample.jsonl",
        val_path: Optional[str] = None,
        val_fraction: float = 0.1,
        predict_path: Optional[str] = None,
        predict_output: Optional[str] = None,
        keep_fields: Optional[list[str]] = None,
        overwrite: bool = False,
        review_below: Optional[float] = None,
        tokenizer: str = "builtin:tiny-deepseek",
        trust_remote_code: bool = False,
        prompt_style: PromptStyle = "auto",
        think: ThinkPolicy = "auto",
        system_prompt: Optional[str] = None,
        instruction: str = DEFAULT_INSTRUCTION,
        labels: list[str] = list(DEFAULT_LABELS),
        check_labels: bool = True,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 512,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        eval_batch_tokens: Optional[int] = None,
        group_by_length: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        predict_chunk_rows: int = 4096,
    ) -> None:
        """
        Args:
            train_path: training JSONL/CSV (instruction/input/output rows, or text/label rows).
            val_path: validation file; when unset, a seeded stratified `val_fraction` of train_path is held out.
            val_fraction: fraction of train_path held out for validation when val_path is unset (0 = none).
            predict_path: file to label with `predict` (JSONL, CSV with `text_column`, or plain text lines).
            predict_output: where `predict` writes its JSONL (default: predictions/<input file name>.labels.jsonl).
            keep_fields: input fields copied into each predict output row (JSONL keys or CSV columns; `text` is the
                input text in every format, and the only field of plain-text input), e.g. [id, date, ticker].
            overwrite: let `predict` replace an output that belongs to another input (default: refuse).
            review_below: predict also writes the rows whose confidence (top probability) is under this to
                <output>.review.jsonl, for a person to label first. null = no review file.
            tokenizer: tokenizer to load (linked to model.model_name_or_path; do not set it twice).
            trust_remote_code: allow code from the model folder (linked to model.trust_remote_code).
            prompt_style: auto (chat template when the tokenizer has one), chat, or plain Instruction/Input/Answer.
            think: <think> policy shared by training and labeling: auto, empty (closed empty block), none.
            system_prompt: optional system message (DeepSeek-R1 advises none).
            instruction: instruction used for text/label rows and for prediction input without one.
            labels: the label set; answers must be one of them when check_labels is on.
            check_labels: reject training/validation rows whose answer is not in `labels`.
            text_column: CSV column (or JSON key) holding the text.
            label_column: CSV column holding the answer.
            max_length: max tokens per row; longer rows lose the end of their input text (counted).
            batch_size: training micro-batch size per device.
            eval_batch_size: validation / prediction batch size per device (the most rows a batch holds).
            eval_batch_tokens: also cut validation / prediction batches (length-sorted) at this many padded tokens
                (rows x longest row): GPU-sized batches of many short or few long rows, little padding. null = rows only.
            group_by_length: batch rows of similar length together (less padding).
            seed: seed of the validation split and of the batch order.
            num_workers: DataLoader worker processes (prediction: they take turns by predict chunk).
            cache_dir: tokenization cache (default $FINLLM_CACHE/tokenized or ~/.cache/finllm_pl/tokenized).
            predict_chunk_rows: rows read, sorted by length and labeled together when predicting (bounds memory;
                larger: less padding, as rows of closer lengths share batches, and a coarser resume point). Each
                rank's first chunk holds 256 rows and each next one twice as many up to this, so labeling starts
                once a small chunk is tokenized.
        """
        super().__init__()
        for name, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size),
                            ("data.max_length", max_length), ("data.predict_chunk_rows", predict_chunk_rows)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if review_below is not None and not 0 < review_below <= 1:
            raise ConfigError(f"data.review_below must be in (0, 1] (a confidence), got {review_below}")
        if eval_batch_tokens is not None and eval_batch_tokens < 1:
            raise ConfigError(f"data.eval_batch_tokens must be >= 1 or null, got {eval_batch_tokens}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if len(set(labels)) != len(labels) or not labels:
            raise ConfigError(f"data.labels must be a non-empty list of distinct labels, got {labels}")
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.formatter: Optional[PromptFormatter] = None
        self.train_set = self.val_set = None
        self._train_sampler: Optional[LengthGroupedBatchSampler] = None
        self._resume: Optional[dict[str, int]] = None
        self._started_stream = None  # predict: a stream whose workers setup started (_start_predict_workers)
        self.predict_model: Optional[str] = None  # predict: predict.model_identity, set by the CLI (job identity)

    # -- setup ------------------------------------------------------------------------------------------
    def build_formatter(self) -> PromptFormatter:
        if self.formatter is None:
            from .model import load_tokenizer

            hp = self.hparams
            tok = load_tokenizer(hp.tokenizer, trust_remote_code=hp.trust_remote_code)
            self.formatter = PromptFormatter(tok, hp.prompt_style, hp.think, hp.system_prompt)
        return self.formatter

    @property
    def label_ids(self) -> list[list[int]]:
        return self.build_formatter().encode_labels(self.hparams.labels)

    def _tokenize(self, path: str):
        hp = self.hparams
        return tokenize_file(path, self.build_formatter(), hp.max_length, hp.instruction,
                             hp.labels if hp.check_labels else None, self.cache_dir, hp.text_column, hp.label_column)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.build_formatter()
        if stage == "predict":
            self._start_predict_workers()
        if stage in ("fit", "validate") and self.train_set is None:
            if stage == "fit" and not hp.train_path:
                raise DataError("data.train_path is not set; give a training file")
            full = self._tokenize(hp.train_path) if hp.train_path else None
            if hp.val_path:
                self.train_set, self.val_set = full, self._tokenize(hp.val_path)
            elif full is not None and hp.val_fraction > 0:
                tr, va = stratified_split(full["gold"] if hp.check_labels else [0] * len(full), hp.val_fraction, hp.seed)
                self.train_set, self.val_set = full.select(tr), full.select(va)
            else:
                self.train_set, self.val_set = full, None
            if stage == "validate" and self.val_set is None:
                raise DataError("nothing to validate: set data.val_path (or data.val_fraction > 0 with data.train_path)")
            for name, ds in (("train", self.train_set), ("val", self.val_set)):
                if ds is not None:
                    cut = sum(ds["truncated"])
                    counts = Counter(ds["gold"])
                    rank_zero_info(
                        f"{name}: {len(ds)} rows, {sum(ds['length'])} tokens, labels "
                        + ", ".join(f"{lab}={counts.get(i, 0)}" for i, lab in enumerate(hp.labels))
                        + (f"; {cut} rows truncated to data.max_length={hp.max_length}" if cut else "")
                    )

    # -- loaders ----------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _pin_memory(self) -> bool:
        """Pinned host batches on a GPU: the copy to the GPU is then truly asynchronous, so the host prepares the
        next batch while the GPU still runs this one (a pageable copy may wait for the GPU's queue first)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rank, world = self._rank_world()
        self._train_sampler = LengthGroupedBatchSampler(self.train_set["length"], hp.batch_size, seed=hp.seed,
                                                        group_by_length=hp.group_by_length, rank=rank, world_size=world)
        if self._resume:
            self._train_sampler.resume_at(self._resume["epoch"], self._resume["batches_done"])
        pad = self.formatter.tokenizer.pad_token_id
        # The model's execution backend says how a training batch is laid out (the fast one adds fixed-shape fields)
        backend = getattr(self.trainer.lightning_module, "backend", None) if self.trainer is not None else None
        collate = backend.train_collate(pad, hp.batch_size) if backend is not None else PlainCollate(pad)
        # Own generator: the DataLoader draws its worker seed from it, not from the global RNG that LoRA dropout
        # uses, so a resumed run's dropout masks match the uninterrupted run's.
        return DataLoader(self.train_set.with_format(None), batch_sampler=self._train_sampler, collate_fn=collate,
                          num_workers=hp.num_workers, pin_memory=self._pin_memory(),
                          generator=torch.Generator().manual_seed(hp.seed))

    def val_dataloader(self):
        if self.val_set is None:
            return []
        hp = self.hparams
        rank, world = self._rank_world()
        sampler = EvalBatchSampler(self.val_set["length"], hp.eval_batch_size, group_by_length=hp.group_by_length,
                                   rank=rank, world_size=world, max_tokens=hp.eval_batch_tokens)
        pad, label_ids = self.formatter.tokenizer.pad_token_id, self.label_ids
        return DataLoader(CountedRows(self.val_set.with_format(None)), batch_sampler=sampler,
                          collate_fn=lambda rows: collate_eval(rows, pad, label_ids), num_workers=hp.num_workers)

    def predict_job(self, world: int) -> tuple[str, dict[str, Any]]:
        """(output path, identity of this labeling job, `world` processes labeling it): a restart resumes only a job
        with the same identity."""
        from .predict import PROGRESS_VERSION, check_keep_fields, default_output, input_fingerprint

        hp = self.hparams
        if not hp.predict_path:
            raise DataError("data.predict_path is not set; give the file to label")
        if os.path.isdir(hp.predict_path):
            raise DataError(f"{hp.predict_path}: is a folder, not a file; give the file to label (data.predict_path)")
        if not os.path.isfile(hp.predict_path):
            raise DataError(f"{hp.predict_path}: no such file; check data.predict_path")
        # the default folder is ours to create; a folder the user named must exist
        output = hp.predict_output or default_output(hp.predict_path)
        expect = {"version": PROGRESS_VERSION, "input": input_fingerprint(hp.predict_path), "labels": list(hp.labels),
                  "world": world, "chunk_rows": hp.predict_chunk_rows, "prompt": self.build_formatter().fingerprint(),
                  "keep_fields": check_keep_fields(hp.keep_fields), "model": self.predict_model,
                  "review_below": hp.review_below}
        return output, expect

    def _predict_stream(self):
        from .predict import PredictStream, finished_earlier, load_progress

        hp = self.hparams
        rank, world = self._rank_world()  # (setup and the loaders run inside trainer.predict: the trainer is known)
        output, expect = self.predict_job(world)
        # A run killed after its output was complete has nothing left to label.
        done = finished_earlier(output, expect) is not None
        start = sys.maxsize if done else load_progress(output, rank, expect)["chunks"]
        return PredictStream(hp.predict_path, self.build_formatter(), self.label_ids, hp.instruction, hp.text_column,
                             hp.eval_batch_size, hp.predict_chunk_rows, hp.max_length, hp.labels,
                             max_tokens=hp.eval_batch_tokens, rank=rank, world_size=world, start_chunk=start,
                             keep_fields=expect["keep_fields"])

    def _predict_loader(self, stream) -> DataLoader:
        from .predict import PredictLoader

        hp = self.hparams
        # Workers read and tokenize the next chunks (taking turns) while the GPU labels; 0 reads in the main process.
        # in_order=False: batches are taken from whichever worker has one ready (the writer restores input order);
        # in order, the loader would wait for each worker in turn, and so for one tokenizing its next chunk.
        return PredictLoader(stream, batch_size=None, num_workers=hp.num_workers, pin_memory=self._pin_memory(),
                             in_order=hp.num_workers == 0, worker_init_fn=prompt_worker_init)

    def _start_predict_workers(self) -> None:
        """predict with workers: they are forked and begin reading and tokenizing here, in setup, which Lightning
        runs before the model loads (configure_model), so the first batches are ready when labeling starts. On an
        H100 (13,173 rows; results/gpu/predict_rows_fold_early_workers.json) the loop waited 0.19-0.24 s for its
        first batch (60-100 ms of it forking the workers), now 0.006-0.012 s; the whole command was not slower
        (10.06-10.85 vs 9.99-11.36 s). The stream keeps the started iterator for the loop's DataLoader
        (predict_dataloader); a run that fails before labeling stops the workers in teardown."""
        self._started_stream = None
        if self.hparams.num_workers > 0:
            stream = self._predict_stream()
            self._predict_loader(stream).start()
            self._started_stream = stream

    def predict_dataloader(self) -> DataLoader:
        stream, self._started_stream = self._started_stream, None
        return self._predict_loader(stream if stream is not None else self._predict_stream())

    def teardown(self, stage: str) -> None:
        if stage == "predict":  # (a run that failed before labeling: its started workers stop)
            stream, self._started_stream = self._started_stream, None
            if stream is not None:
                stream.started = None

    # -- exact mid-epoch resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data: the epoch and how many of its batches were trained on.

        Read from the loop's progress (batches *processed*), not from the DataLoader: Lightning prefetches a
        batch ahead, so a loader-side counter would skip one batch on resume.
        """
        t = self.trainer
        if t is None or not t.training:
            return {}
        # After the epoch's last batch (a save at the end of fit), current_epoch already names the next epoch,
        # of which nothing was done yet.
        epochs = t.fit_loop.epoch_progress.current
        done = t.fit_loop.epoch_loop.batch_progress.current.processed if epochs.started > epochs.completed else 0
        return {"epoch": t.current_epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state) if state else None

"""How much of predict's work is padding, for each (data.predict_chunk_rows, data.eval_batch_tokens) pair: CPU only.

predict reads `chunk_rows` rows at a time, sorts them by prompt length and cuts batches of at most `batch_tokens`
padded tokens (finllm_pl.batching.budget_batches), exactly as below. Label scoring runs the batch's shared prompt
prefix once, so the work per batch is rows x (longest prompt - shared prefix); padding is what that exceeds
the rows' own tokens after the prefix by. Fewer, larger batches cost less per row on the GPU; rows of closer
lengths pad less. Prints a table and writes JSON.

    python benchmarks/label_padding.py --tokenizer DIR --data instruction_formatted_data.jsonl --repeat 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer  # noqa: E402

from finllm_pl.batching import budget_batches, shared_prefix_ids  # noqa: E402
from finllm_pl.prompts import DEFAULT_INSTRUCTION, PromptFormatter  # noqa: E402
from finllm_pl.records import iter_rows  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True, help="JSONL or text to label")
    ap.add_argument("--repeat", type=int, default=1, help="the data this many times over (as predict_rows --repeat)")
    ap.add_argument("--chunks", default="4096,8192,16384,32768")
    ap.add_argument("--budgets", default="16384,32768,65536")
    ap.add_argument("--max-rows", type=int, default=4096, help="data.eval_batch_size")
    ap.add_argument("--out", default="results/label_padding.json")
    a = ap.parse_args(argv)
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(a.tokenizer))
    rows = list(iter_rows(a.data, instruction=DEFAULT_INSTRUCTION, need_output=False, text_column="input")) * a.repeat
    prompts = fmt.encode_prompts([(r.instruction, r.input) for r in rows], "negative", 512)
    lengths = [len(p) for p in prompts]
    runs = []
    for chunk in map(int, a.chunks.split(",")):
        for budget in map(int, a.budgets.split(",")):
            batches = computed = own = 0
            for start in range(0, len(rows), chunk):
                order = sorted(range(start, min(start + chunk, len(rows))), key=lambda i: -lengths[i])
                for b in budget_batches(order, lengths, a.max_rows, budget):
                    P = len(shared_prefix_ids([prompts[i] for i in b])) if len(b) > 1 else 0
                    computed += len(b) * (max(lengths[i] for i in b) - P)
                    own += sum(lengths[i] - P for i in b)
                    batches += 1
            runs.append({"chunk_rows": chunk, "batch_tokens": budget, "batches": batches,
                         "computed_tokens": computed, "padding": computed / own - 1})
    print("| predict_chunk_rows | eval_batch_tokens | batches | computed tokens | padding |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['chunk_rows']} | {r['batch_tokens']} | {r['batches']} | {r['computed_tokens']:,} | "
              f"{100 * r['padding']:.1f}% |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"tokenizer": os.path.abspath(a.tokenizer), "data": os.path.abspath(a.data),
                                       "rows": len(rows), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# DDP scaling on 2 GPUs for the DeepSeek-R1-Distill-Qwen-1.5B architecture (random weights, tiny-deepseek tokenizer),
# on the fast backend (which steps its static step aside under DDP, saying so): fit on 1 GPU (micro 16 x accum 2)
# vs 2 GPUs (micro 16 x accum 1, same effective batch 32), then predict the same rows on 1 and 2 GPUs and compare.
# Usage: benchmarks/ddp_scaling.sh DATA.jsonl OUT_DIR [STEPS]
set -euo pipefail
data=$1; out=$2; steps=${3:-40}
mkdir -p "$out"; model=/tmp/qwen1.5b-random
python3 -c "
from finllm_pl.assets import build_random_qwen_1_5b, ensure_builtin
build_random_qwen_1_5b('$model', ensure_builtin('tiny-deepseek'))"
common=(--config configs/deepseek_r1_distill_qwen_1.5b_fast.yaml --model.model_name_or_path "$model"
        --data.train_path "$data" --data.val_fraction 0 --data.batch_size 16 --data.group_by_length true
        --model.gradient_checkpointing false --trainer.max_steps "$steps" --trainer.enable_progress_bar false
        --trainer.log_every_n_steps 1 --checkpoint.every_n_train_steps 1000)
for n in 1 2; do
  python3 -m finllm_pl fit "${common[@]}" --trainer.devices $n --trainer.strategy ddp \
    --model.accumulate_grad_batches $((2 / n)) --checkpoint.dirpath /tmp/ddp$n --trainer.default_root_dir /tmp/ddp$n \
    --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir /tmp/ddp$n > "$out/fit$n.log" 2>&1
  cp /tmp/ddp$n/lightning_logs/version_0/metrics.csv "$out/fit${n}_metrics.csv"
done
head -n 2001 "$data" | tail -n 2000 > /tmp/predict_rows.jsonl
for n in 1 2; do
  python3 -m finllm_pl predict --config configs/deepseek_r1_distill_qwen_1.5b_fast.yaml --model.model_name_or_path "$model" \
    --ckpt_path /tmp/ddp1/adapter --data.predict_path /tmp/predict_rows.jsonl --data.predict_output /tmp/pred$n.jsonl \
    --data.eval_batch_size 128 --data.predict_chunk_rows 256 --trainer.devices $n --trainer.strategy ddp \
    --trainer.enable_progress_bar false > "$out/predict$n.log" 2>&1
done
python3 - "$out" <<'PY'
import csv, json, sys
out = sys.argv[1]
def steps(n):
    rows = [r for r in csv.DictReader(open(f"{out}/fit{n}_metrics.csv")) if r.get("train/loss")]
    return [(int(r["step"]), float(r["train/loss"]), float(r["train/tokens_per_s"])) for r in rows]
one, two = steps(1), steps(2)
tps = lambda s: sum(t for _, _, t in s[5:]) / max(1, len(s[5:]))  # skip warm-up steps
a = [json.loads(l) for l in open("/tmp/pred1.jsonl")]; b = [json.loads(l) for l in open("/tmp/pred2.jsonl")]
res = {"fit_tokens_per_s_1gpu": tps(one), "fit_tokens_per_s_2gpu_per_rank0_window": tps(two),
       "losses_1gpu": [l for _, l, _ in one], "losses_2gpu": [l for _, l, _ in two],
       "predict_rows": [len(a), len(b)], "predict_same_ids_in_order": [r["id"] for r in a] == [r["id"] for r in b],
       "predict_same_labels": sum(x["label"] == y["label"] for x, y in zip(a, b)),
       "predict_max_prob_diff": max(abs(x["probs"][k] - y["probs"][k]) for x, y in zip(a, b) for k in x["probs"])}
json.dump(res, open(f"{out}/ddp_scaling.json", "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if not k.startswith("losses")}, indent=1))
print("loss 1gpu", [round(x, 3) for x in res["losses_1gpu"]])
print("loss 2gpu", [round(x, 3) for x in res["losses_2gpu"]])
PY

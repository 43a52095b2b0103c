"""Classification metrics (torchmetrics) and the reports written next to a run: JSON, Markdown, confusion PNG.

Weighted-F1 is FinGPT's headline number; macro-F1 is the honest one on imbalanced sets (FPB is 60% neutral);
both are reported, with per-class precision/recall/F1 and the confusion matrix (rows = gold, columns = predicted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from .files import write_atomic


def label_metrics(num_classes: int, sync: bool = True) -> MetricCollection:
    """sync: compute() sums the states of all DDP ranks (a collective: every rank must call it). sync=False for
    metrics that one rank computes alone (e.g. rank 0 reading a merged output file)."""
    k, kw = num_classes, {"sync_on_compute": sync}
    return MetricCollection({
        "accuracy": MulticlassAccuracy(k, average="micro", **kw),
        "f1_macro": MulticlassF1Score(k, average="macro", **kw),
        "f1_weighted": MulticlassF1Score(k, average="weighted", **kw),
        "precision": MulticlassPrecision(k, average=None, **kw),
        "recall": MulticlassRecall(k, average=None, **kw),
        "f1": MulticlassF1Score(k, average=None, **kw),
        "confusion": MulticlassConfusionMatrix(k, **kw),
    })


def summarize(values: dict[str, torch.Tensor], labels: Sequence[str], extra: dict[str, Any] | None = None) -> dict:
    """Plain-JSON report from a computed MetricCollection."""
    report: dict[str, Any] = {k: float(values[k]) for k in ("accuracy", "f1_macro", "f1_weighted")}
    cm = values["confusion"].long().tolist()
    report["support"] = int(sum(map(sum, cm)))
    report["per_class"] = {
        label: {"precision": float(values["precision"][i]), "recall": float(values["recall"][i]),
                "f1": float(values["f1"][i]), "support": int(sum(cm[i]))}
        for i, label in enumerate(labels)
    }
    report["labels"] = list(labels)
    report["confusion_matrix"] = cm
    report.update(extra or {})
    return report


def to_markdown(report: dict, title: str = "Validation report") -> str:
    labels = report["labels"]
    lines = [f"# {title}", ""]
    for key in ("source", "checkpoint", "rows", "val_loss", "unparsed"):
        if key in report:
            lines.append(f"- {key}: {report[key]}")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {report[k]:.4f} |" for k in ("accuracy", "f1_macro", "f1_weighted")]
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for lab in labels:
        if lab not in report["per_class"]:  # the "(unparsed)" column of generated answers is not a class
            continue
        c = report["per_class"][lab]
        lines.append(f"| {lab} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += ["", "Confusion matrix (rows: gold, columns: predicted)", "",
              "| gold \\ pred | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for lab, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def confusion_figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, cm = report["labels"], report["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"acc {report['accuracy']:.3f} | macro-F1 {report['f1_macro']:.3f} | weighted-F1 {report['f1_weighted']:.3f}")
    fig.tight_layout()
    return fig


def write_report(report: dict, out_dir: str, stem: str = "validation", title: str = "Validation report") -> list[Path]:
    """`<stem>.json`, `<stem>.md` and `<stem>_confusion.png` in out_dir, each written atomically."""
    import io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}_confusion.png"]
    write_atomic(paths[0], (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(paths[1], to_markdown(report, title).encode())
    fig = confusion_figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    write_atomic(paths[2], buf.getvalue())
    return paths

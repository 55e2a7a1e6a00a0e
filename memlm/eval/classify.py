"""Classification metrics: accuracy, macro-F1, the confusion matrix (a table, and a PNG)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memlm.errors import require_extra


@dataclass
class ClassifyResult:
    classes: list[str]
    confusion: list[list[int]]  # confusion[true][predicted]
    name: str = ""
    per_class_f1: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        return sum(self.confusion[i][i] for i in range(len(self.classes))) / max(self.n, 1)

    @property
    def macro_f1(self) -> float:
        return sum(self.per_class_f1) / max(len(self.per_class_f1), 1)

    def to_dict(self) -> dict:
        return {"name": self.name, "n": self.n, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "classes": self.classes, "per_class_f1": self.per_class_f1, "confusion": self.confusion}


def metrics(y_true: list[int], y_pred: list[int], classes: list[str], name: str = "") -> ClassifyResult:
    """Confusion matrix and per-class F1 (2PR / (P + R); 0 for a class never predicted nor present)."""
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        confusion[t][p] += 1
    f1 = []
    for c in range(k):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(k))
        actual = sum(confusion[c])
        f1.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return ClassifyResult(classes, confusion, name, f1)


def majority_baseline(train_labels: list[int], y_true: list[int], classes: list[str]) -> ClassifyResult:
    """Always the most frequent training class."""
    majority = Counter(train_labels).most_common(1)[0][0]
    return metrics(y_true, [majority] * len(y_true), classes, "majority class")


@torch.no_grad()
def predict(model, batches) -> tuple[list[int], list[int]]:
    """(true labels, predicted labels) over batches of (x, y = [label, length]) (memlm.data_classify)."""
    model.eval()
    device = next(model.parameters()).device
    true, pred = [], []
    for x, y in batches:
        logits = model(x.to(device), y[:, 1].to(device))
        pred += logits.argmax(-1).tolist()
        true += y[:, 0].tolist()
    return true, pred


def confusion_table(result: ClassifyResult):
    from rich.table import Table

    table = Table(title=f"confusion matrix{f' ({result.name})' if result.name else ''}: rows true, columns predicted")
    table.add_column("true \\ predicted")
    for c in result.classes:
        table.add_column(c, justify="right")
    table.add_column("F1", justify="right")
    for i, c in enumerate(result.classes):
        table.add_row(c, *[str(v) for v in result.confusion[i]], f"{result.per_class_f1[i]:.3f}")
    return table


def plot_confusion(result: ClassifyResult, path: str | Path) -> Path:
    """The confusion matrix as a PNG (needs matplotlib: pip install 'memlm[plots]')."""
    matplotlib = require_extra("matplotlib", "plots")
    matplotlib.use("Agg")
    plt = require_extra("matplotlib.pyplot", "plots")
    k = len(result.classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.7 * k))
    ax.imshow(result.confusion, cmap="Blues")
    ax.set_xticks(range(k), result.classes, rotation=45, ha="right")
    ax.set_yticks(range(k), result.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in result.confusion) or 1
    for i in range(k):
        for j in range(k):
            v = result.confusion[i][j]
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    ax.set_title(f"{result.name}: accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

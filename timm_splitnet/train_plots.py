""" Training curves of a SplitNet run

`plot_curves(summary_csv, png)` draws, from the `summary.csv` that `train.py` writes (timm's `update_summary`
layout), the eval top-1 of the ensemble and of every member, and the train loss with its CE and co-training parts,
against the epoch. matplotlib is imported lazily (Agg backend): it is an optional dependency.

Hacked together by the timm-splitnet authors
"""
import csv
import math
import re
from typing import Dict, List

__all__ = ['read_summary', 'plot_curves']

_MEMBER_TOP1 = re.compile(r'^eval_member(\d+)_top1$')


def read_summary(summary_csv: str) -> Dict[str, List[float]]:
    """Columns of a `summary.csv` as float lists (NaN where a value is missing or not a number)."""
    with open(summary_csv, newline='') as f:
        rows = list(csv.DictReader(f))
    columns: Dict[str, List[float]] = {}
    for row in rows:
        for key in row:
            if key is not None:
                columns.setdefault(key, [])
    for row in rows:
        for key, values in columns.items():
            try:
                values.append(float(row.get(key)))
            except (TypeError, ValueError):
                values.append(math.nan)
    return columns


def plot_curves(summary_csv: str, png: str) -> str:
    """Plot member / ensemble eval top-1 and the loss parts against the epoch.

    Args:
        summary_csv: `summary.csv` of a `train.py` run.
        png: Output image path.

    Returns:
        The path of the image.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    data = read_summary(summary_csv)
    epochs = data.get('epoch', [])
    members = sorted(
        (int(m.group(1)), key) for key in data for m in [_MEMBER_TOP1.match(key)] if m is not None)

    marker = '.' if len(epochs) <= 30 else None  # short runs: show the points
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, key in members:
        ax_acc.plot(epochs, data[key], lw=1, alpha=0.8, marker=marker, label=f'member {index}')
    if 'eval_top1' in data:
        ax_acc.plot(epochs, data['eval_top1'], lw=2, color='black', marker=marker, label='ensemble')
    if 'eval_ema_top1' in data:
        ax_acc.plot(epochs, data['eval_ema_top1'], lw=1.5, ls='--', color='black', label='ensemble (EMA)')
    ax_acc.set_xlabel('epoch')
    ax_acc.set_ylabel('eval top-1 (%)')
    ax_acc.set_title('Eval accuracy')
    ax_acc.grid(alpha=0.3)
    if members or 'eval_top1' in data:
        ax_acc.legend(loc='lower right')

    for key, label, style in (
            ('train_loss', 'train loss (total)', dict(lw=2, color='black')),
            ('train_loss_ce', 'train CE (sum over members)', dict(lw=1.2)),
            ('train_loss_cot', 'train co-training (JS, unweighted)', dict(lw=1.2)),
            ('eval_loss', 'eval CE (ensemble)', dict(lw=1.2, ls='--')),
    ):
        if key in data:
            ax_loss.plot(epochs, data[key], label=label, marker=marker, **style)
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('loss')
    ax_loss.set_title('Losses')
    if any(v > 0 for k in ('train_loss', 'train_loss_ce') for v in data.get(k, []) if not math.isnan(v)):
        ax_loss.set_yscale('log')
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc='best')

    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png

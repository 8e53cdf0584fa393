""" Plots of SplitNet results: latency comparison (`benchmark.py`), training curves (`train.py`), reliability
diagrams (`validate.py`)

matplotlib is imported lazily with the Agg backend: importing this module needs neither a display nor matplotlib.
"""
import csv
import math
import re
import textwrap
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    'plot_latency', 'latency_figure', 'read_summary', 'plot_curves', 'curves_figure', 'plot_reliability',
    'reliability_figure',
]

_MODE_ORDER = ('undivided', 'single', 'sequential', 'concurrent', 'member_parallel')
_MODE_COLORS = {'undivided': '#7f7f7f', 'single': '#7f7f7f', 'sequential': '#1f77b4', 'concurrent': '#d62728',
                'member_parallel': '#ff7f0e'}


def _infer_latency(row: Dict[str, Any]) -> Optional[float]:
    """Median inference latency per image (ms), else the mean step time per image."""
    if row.get('infer_latency_ms') is not None:
        return float(row['infer_latency_ms'])
    if row.get('infer_step_time') is not None and row.get('infer_batch_size'):
        return float(row['infer_step_time']) / float(row['infer_batch_size'])
    return None


def _train_step(row: Dict[str, Any]) -> Optional[float]:
    value = row.get('train_step_time_median', row.get('train_step_time'))
    return None if value is None else float(value)


def _legend(row: Dict[str, Any]) -> str:
    mode = row.get('split_mode') or 'single'
    devices = row.get('devices') or row.get('device')
    return f'{mode} ({devices})' if devices else mode


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str, dpi: int) -> str:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_latency(results: Sequence[Dict[str, Any]], path: str, title: Optional[str] = None) -> str:
    """Draw latency bars per model and split mode (undivided / sequential / concurrent) and save them to `path`;
    rows with a ratio to S=1 (`infer_vs_s1`, `train_vs_s1` and their `_lo` / `_hi`) add a panel of the ratios with
    their interquartile ranges.

    Args:
        results: `benchmark.py` result rows (`group` or `model`, `split_mode`, `infer_latency_ms` or
            `infer_step_time` + `infer_batch_size`, optionally `train_step_time[_median]`). Rows with an `error`
            are skipped.
        path: Output image file; the format follows the extension (png, pdf, svg).
        title: Figure title (default: batch size and precision-free summary of the rows).

    Returns:
        `path`.

    Raises:
        ValueError: No row has a latency to plot.
    """
    return _save(latency_figure(results, title), path, dpi=120)


def latency_figure(results: Sequence[Dict[str, Any]], title: Optional[str] = None):
    """The matplotlib figure of `plot_latency` (not saved); the title is wrapped to the figure's width."""
    plt = _pyplot()
    rows = [r for r in results if not r.get('error')]
    panels = []
    if any(_infer_latency(r) is not None for r in rows):
        panels.append(('inference latency per image (ms)', _infer_latency))
    if any(_train_step(r) is not None for r in rows):
        panels.append(('train step time (ms)', _train_step))
    ratio_rows = [r for r in rows if any(r.get(f'{k}_vs_s1') is not None for k in ('infer', 'train'))]
    if not panels:
        raise ValueError('No latency results to plot (expected benchmark rows with infer_* or train_* times).')

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get('group') or r.get('model')), []).append(r)
    for members in groups.values():
        members.sort(key=lambda r: _MODE_ORDER.index(r.get('split_mode')) if r.get('split_mode') in _MODE_ORDER else 9)
    max_bars = max(len(m) for m in groups.values())

    num_axes = len(panels) + bool(ratio_rows)
    fig, axes = plt.subplots(
        1, num_axes, figsize=(max(6., 1.6 + len(groups) * (0.9 + 0.55 * max_bars)) * num_axes, 4.8),
        squeeze=False)
    if ratio_rows:
        _ratio_panel(axes[0][-1], ratio_rows)
    width = 0.8 / max_bars
    for ax, (ylabel, value_fn) in zip(axes[0], panels):
        seen_labels = set()
        for gi, members in enumerate(groups.values()):
            offset = (len(members) - 1) / 2
            for bi, r in enumerate(members):
                value = value_fn(r)
                if value is None:
                    continue
                mode = r.get('split_mode') or 'single'
                x = gi + (bi - offset) * width
                legend = _legend(r)
                bar = ax.bar(
                    x, value, width * 0.92, color=_MODE_COLORS.get(mode, '#2ca02c'),
                    label=legend if legend not in seen_labels else None)
                seen_labels.add(legend)
                s = r.get('split_factor')
                ax.bar_label(bar, labels=[f'{value:.3g}' + (f'\nS={s}' if s else '')], fontsize=7, padding=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), rotation=15, ha='right', fontsize=8)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
        ax.grid(axis='y', alpha=0.3)
        ax.legend(fontsize=8)
    if title is None:
        batch = sorted({r.get('infer_batch_size') or r.get('train_batch_size') for r in rows} - {None})
        title = 'SplitNet latency: undivided network vs its members (sequential / concurrent / member-parallel)' + (
            f' (batch {", ".join(str(b) for b in batch)})' if batch else '')
    # about 0.085 in per character at 10 pt: wrap the title to the figure's width instead of letting it run off
    width_chars = max(20, int(fig.get_figwidth() / 0.085))
    title = '\n'.join(textwrap.wrap(title, width_chars))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _ratio_panel(ax, rows: Sequence[Dict[str, Any]]) -> None:
    """Bars of the throughput ratio to S=1 (median of the paired rounds) with the interquartile range as error bars,
    inference beside training, and the FLOP bound of each row as a marker."""
    width = 0.38
    for k, (kind, color) in enumerate((('infer', '#1f77b4'), ('train', '#ff7f0e'))):
        xs, med, err = [], [], [[], []]
        for i, r in enumerate(rows):
            if r.get(f'{kind}_vs_s1') is None:
                continue
            m = float(r[f'{kind}_vs_s1'])
            xs.append(i + (k - 0.5) * width)
            med.append(m)
            err[0].append(m - float(r.get(f'{kind}_vs_s1_lo', m)))
            err[1].append(float(r.get(f'{kind}_vs_s1_hi', m)) - m)
        if xs:
            ax.bar(xs, med, width * 0.92, yerr=err, capsize=3, color=color, label=f'{kind} (median, IQR)')
    bounds = [(i, float(r['flop_bound_vs_s1'])) for i, r in enumerate(rows) if r.get('flop_bound_vs_s1') is not None]
    if bounds:
        ax.plot([b[0] for b in bounds], [b[1] for b in bounds], 'k_', markersize=22, mew=2, label='FLOP bound')
    ax.axhline(1.0, color='k', lw=0.8, ls='--')
    labels = []
    for r in rows:
        how = [x for x in (r.get('split_backend'), r.get('split_mode')) if x and x not in ('sequential',)]
        labels.append(f'{str(r.get("model", "")).replace("splitnet_", "")}' + (f'\n{", ".join(how)}' if how else ''))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=15, ha='right', fontsize=8)
    ax.set_ylabel('img/s relative to S=1 (paired rounds)')
    ax.grid(axis='y', alpha=0.3)
    ax.legend(fontsize=8)


# ----- training curves -----


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
    return _save(curves_figure(summary_csv), png, dpi=100)


def _points(epochs: List[float], values: List[float]):
    """The (epoch, value) pairs that have a value: an eval column is empty on epochs without evaluation."""
    pairs = [(e, v) for e, v in zip(epochs, values) if not math.isnan(v)]
    return ([e for e, _ in pairs], [v for _, v in pairs])


def curves_figure(summary_csv: str):
    """The matplotlib figure of `plot_curves` (not saved): whole-number epoch ticks."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    data = read_summary(summary_csv)
    epochs = data.get('epoch', [])
    members = sorted(
        (int(m.group(1)), key) for key in data for m in [_MEMBER_TOP1.match(key)] if m is not None)

    marker = '.' if len(epochs) <= 30 else None  # short runs: show the points
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, key in members:
        ax_acc.plot(*_points(epochs, data[key]), lw=1, alpha=0.8, marker=marker, label=f'member {index}')
    if 'eval_top1' in data:
        ax_acc.plot(*_points(epochs, data['eval_top1']), lw=2, color='black', marker=marker, label='ensemble')
    if 'eval_ema_top1' in data:
        ax_acc.plot(*_points(epochs, data['eval_ema_top1']), lw=1.5, ls='--', color='black', label='ensemble (EMA)')
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
            ax_loss.plot(*_points(epochs, data[key]), label=label, marker=marker, **style)
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('loss')
    ax_loss.set_title('Losses')
    if any(v > 0 for k in ('train_loss', 'train_loss_ce') for v in data.get(k, []) if not math.isnan(v)):
        ax_loss.set_yscale('log')
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc='best')
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers, also on short runs

    fig.tight_layout()
    return fig


# ----- reliability diagram -----


def plot_reliability(curves: dict[str, dict[str, list[float]]], path: str, title: str | None = None) -> str:
    """Draw a reliability diagram (top-1 accuracy against confidence per bin, bin counts below) and save it.

    Args:
        curves: Label -> reliability data of `timm_splitnet.utils.metrics` (`CalibrationMeter.reliability`,
            `EnsembleMetrics.reliability`): bin `edges`, per bin `count`, `confidence` and `accuracy` (NaN where a
            bin is empty), and the `ece` shown in the legend.
        path: Output image file; the format follows the extension (png, pdf, svg).
        title: Figure title.

    Returns:
        `path`.

    Raises:
        ValueError: No curve to plot.
    """
    return _save(reliability_figure(curves, title), path, dpi=100)


def reliability_figure(curves: dict[str, dict[str, list[float]]], title: str | None = None):
    """The matplotlib figure of `plot_reliability` (not saved): the legend sits below the plots, off the bars."""
    if not curves:
        raise ValueError('No reliability data to plot.')
    plt = _pyplot()
    fig, (ax_acc, ax_count) = plt.subplots(
        2, 1, figsize=(6, 8), sharex=True, gridspec_kw={'height_ratios': (3, 1.2)})
    ax_acc.plot([0, 1], [0, 1], ls='--', lw=1, color='gray', label='perfect calibration')
    width = 0.8 / len(curves)
    for ci, (label, data) in enumerate(curves.items()):
        edges = data['edges']
        bin_width = edges[1] - edges[0]
        lefts = edges[:-1]
        color = f'C{ci}'
        ece = data.get('ece')
        text = f'{label} (ECE {ece:.4f})' if ece is not None and not math.isnan(ece) else label
        accuracy = [0. if math.isnan(a) else a for a in data['accuracy']]
        if ci == 0:  # the first curve as bars, the others as outlines
            ax_acc.bar(lefts, accuracy, width=bin_width, align='edge', color=color, alpha=0.4, edgecolor=color, lw=1,
                       label=text)
        else:  # empty bins (NaN) leave a gap instead of a step down to 0
            ax_acc.stairs(data['accuracy'], edges, color=color, lw=1.5, label=text)
        points = [(c, a) for c, a in zip(data['confidence'], data['accuracy']) if not math.isnan(a)]
        if points:
            ax_acc.plot(*zip(*points), marker='o', ms=4, lw=1, color=color,
                        label=f'{label}: (mean confidence, accuracy)')
        centers = [e + bin_width * (0.1 + width * (ci + 0.5)) for e in lefts]
        ax_count.bar(centers, data['count'], width=bin_width * width, color=color, alpha=0.7, label=label)
    ax_acc.set_xlim(0, 1)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_ylabel('top-1 accuracy')
    ax_acc.grid(alpha=0.3)
    ax_acc.set_title(title or f'Reliability diagram ({len(next(iter(curves.values()))["count"])} bins)', fontsize=10)
    ax_count.set_xlabel('top-1 confidence')
    ax_count.set_ylabel('samples per bin')
    ax_count.grid(alpha=0.3)
    # the legend under the count plot: inside the accuracy plot it would hide the bars of some bins
    handles, labels = ax_acc.get_legend_handles_labels()
    legend = fig.legend(handles, labels, loc='lower center', fontsize=8, ncol=1, frameon=False)
    fig.tight_layout()
    fig.canvas.draw()  # the legend's height, then the room it needs below the plots
    height = legend.get_window_extent().height / fig.bbox.height
    fig.tight_layout(rect=(0, height + 0.01, 1, 1))
    return fig

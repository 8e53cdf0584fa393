"""The PNG plots' layout: titles inside the figure, legends off the data, whole-number epoch ticks (issue 18).

Each plot's figure is built, drawn and measured in display coordinates; the written PNG is opened and its size
checked against the figure's.
"""
import math

import pytest
from PIL import Image

from timm_splitnet import plots

pytest.importorskip('matplotlib')


def _renderer(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _inside(inner, outer, tol: float = 1.) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol and inner.x1 <= outer.x1 + tol and
            inner.y1 <= outer.y1 + tol)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


LATENCY_ROWS = [  # one group, inference only: the narrowest figure (one panel)
    dict(model='splitnet_wrn16_8_s1', group='splitnet_wrn16_8_s2', split_mode='undivided', split_factor=1,
         infer_latency_ms=1.0, infer_batch_size=8, devices='cpu'),
    dict(model='splitnet_wrn16_8_s2', group='splitnet_wrn16_8_s2', split_mode='sequential', split_factor=2,
         infer_latency_ms=1.2, infer_batch_size=8, devices='cpu'),
]


def test_latency_title_fits_the_figure(tmp_path):
    fig = plots.latency_figure(LATENCY_ROWS)
    renderer = _renderer(fig)
    title = fig._suptitle
    assert 'SplitNet latency' in title.get_text() and '(batch 8)' in title.get_text()
    assert _inside(title.get_window_extent(renderer), fig.bbox), (title.get_window_extent(renderer), fig.bbox)
    for ax in fig.axes:  # the wrapped title does not run into the plot either
        assert not _overlap(title.get_window_extent(renderer), ax.get_window_extent(renderer))
    png = plots.plot_latency(LATENCY_ROWS, str(tmp_path / 'latency.png'))
    with Image.open(png) as img:
        assert img.size == (round(fig.get_figwidth() * 120), round(fig.get_figheight() * 120))


def _reliability_curves():
    # low-confidence bins full of samples: the bars stand where an in-plot legend used to be (upper left)
    edges = [i / 15 for i in range(16)]
    accuracy = [math.nan, 0.9, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    confidence = [math.nan] + [(edges[i] + edges[i + 1]) / 2 for i in range(1, 15)]
    count = [0] + [50] * 14
    return {
        'ensemble (logits + mean)': dict(edges=edges, accuracy=accuracy, confidence=confidence, count=count, ece=0.1),
        'mean member': dict(edges=edges, accuracy=accuracy, confidence=confidence, count=count, ece=0.12),
    }


def test_reliability_legend_stays_off_the_bars(tmp_path):
    from matplotlib.patches import Rectangle
    fig = plots.reliability_figure(_reliability_curves(), title='splitnet_resnet110_s2: reliability (top-1, 15 bins)')
    renderer = _renderer(fig)
    legend = fig.legends[0].get_window_extent(renderer)
    assert _inside(legend, fig.bbox)
    bars = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle) and p.get_height() > 0]
    assert len(bars) >= 14
    for ax in fig.axes:
        assert not _overlap(legend, ax.get_window_extent(renderer))
    assert not any(_overlap(legend, bar.get_window_extent(renderer)) for bar in bars)
    assert len(fig.legends[0].get_texts()) == 5  # perfect calibration, two curves and their points
    png = plots.plot_reliability(_reliability_curves(), str(tmp_path / 'reliability.png'))
    with Image.open(png) as img:
        assert img.size == (round(fig.get_figwidth() * 100), round(fig.get_figheight() * 100))


def test_curves_have_whole_epoch_ticks_and_skip_epochs_without_eval(tmp_path):
    summary = tmp_path / 'summary.csv'
    summary.write_text(
        'epoch,train_loss,train_loss_ce,train_loss_cot,eval_loss,eval_top1,eval_member0_top1,eval_member1_top1,lr\n'
        '0,4.0,3.9,0.2,2.0,30,25,26,0.1\n1,3.0,2.9,0.1,,,,,0.05\n2,2.5,2.4,0.1,1.5,50,45,44,0.01\n')
    fig = plots.curves_figure(str(summary))
    _renderer(fig)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    ensemble = next(line for line in fig.axes[0].get_lines() if line.get_label() == 'ensemble')
    assert list(ensemble.get_xdata()) == [0, 2] and list(ensemble.get_ydata()) == [30, 50]  # epoch 1: no eval
    png = plots.plot_curves(str(summary), str(tmp_path / 'curves.png'))
    with Image.open(png) as img:
        assert img.size == (1200, 450)

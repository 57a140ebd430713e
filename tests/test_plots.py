"""Plots train.py and test.py write: image mosaics with labelled boxes, results.png, evolve.png, PR and
P/R/F1-confidence curves, confusion matrix."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from utils.eval.plots import (
    RESULTS_COLUMNS,
    blues,
    class_color,
    matrix_geometry,
    output_to_target,
    plot_confusion_matrix,
    plot_evolution,
    plot_images,
    plot_mc_curve,
    plot_pr_curve,
    plot_results,
    smooth,
)


def test_output_to_target_normalises():
    out = [torch.tensor([[10., 20, 50, 60, 0.9, 3]]), torch.zeros(0, 6)]
    t = output_to_target(out, width=100, height=200)
    assert t.shape == (1, 7) and t[0].tolist() == pytest.approx([0, 3, 0.3, 0.2, 0.4, 0.2, 0.9])


def test_plot_images_draws_class_coloured_boxes(tmp_path):
    imgs = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)  # black (B, 3, H, W)
    targets = torch.tensor([[1, 2, 0.5, 0.5, 0.5, 0.5]])  # image 1, class 2, centre box of half size
    f = tmp_path / 'batch.jpg'
    mosaic = plot_images(imgs, targets, paths=['a.jpg', 'b.jpg'], fname=f, names=['x', 'y', 'car'])
    assert f.is_file() and cv2.imread(str(f)).shape == mosaic.shape == (2 * 64, 2 * 96, 3)
    # image 1 is the second tile of the first row: its box's left edge runs at x = 96 + 24, y from 16 to 48
    near_edge = mosaic[30:45, 96 + 22:96 + 27].astype(int)  # anti-aliased line: the closest pixel to the colour
    assert np.abs(near_edge - class_color(2)[::-1]).sum(-1).min() < 40  # the RGB mosaic gets the class colour
    assert mosaic[32, 96 + 48].tolist() == [0, 0, 0]  # inside the box: the image itself
    assert mosaic[100, 40].tolist() == [255, 255, 255]  # empty tiles stay white
    # predictions (7 columns): only boxes above the confidence threshold are drawn
    pred = np.array([[0, 1, 0.5, 0.5, 0.5, 0.5, 0.2]])
    assert plot_images(imgs, pred, fname=None)[4:60, 4:92].max() == 0  # conf 0.2: nothing drawn in tile 0
    pred[0, 6] = 0.9
    assert plot_images(imgs, pred, fname=None)[4:60, 4:92].max() > 100  # conf 0.9: box and label drawn


def _results_file(path, epochs=3):
    rows = []
    for e in range(epochs):
        losses = [3 - 0.5 * e, 2 - 0.3 * e, 1 - 0.2 * e]
        vals = [0.3 + 0.05 * e, 0.4, 0.35 + 0.02 * e, 0.2 + 0.01 * e, 0.35, 2.5, 1.5, 0.8]
        rows.append(('%10s' * 2 + '%10.3g' * 6 + '%10.4g' * 8) % (f'{e}/{epochs - 1}', '1.2G', *losses, sum(losses),
                                                                 120, 320, *vals))
    path.write_text('\n'.join(rows) + '\n')
    return path


@pytest.fixture
def drawn_figures(monkeypatch) -> list:
    """matplotlib figures the plot functions close after saving, kept open here so a test reads back what they drew."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, 'close', figures.append)
    yield figures
    for fig in figures:
        close(fig)


def test_plot_results_every_column(tmp_path, drawn_figures):
    f = _results_file(tmp_path / 'results.txt')
    rows = np.array([[float(v) for v in line.split()[2:]] for line in f.read_text().splitlines()])  # (3, 14)
    out = plot_results(f, save_path=tmp_path / 'results.png')
    assert cv2.imread(str(out)) is not None
    (fig,) = drawn_figures
    axes = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in axes] == list(RESULTS_COLUMNS)
    for k, ax in enumerate(axes):  # each subplot draws its column against the epoch (0, 1, 2 from '0/2', ...)
        assert ax.lines[0].get_xdata().tolist() == [0, 1, 2]
        assert ax.lines[0].get_ydata().tolist() == pytest.approx(rows[:, k].tolist(), rel=1e-3)
    bad = tmp_path / 'bad.txt'
    bad.write_text('0/2 0G 1 2 x\n')
    with pytest.raises(ValueError, match="bad.txt: cannot read 'x'"):
        plot_results(bad, save_path=tmp_path / 'bad.png')
    assert not (tmp_path / 'bad.png').exists()


def test_plot_evolution_marks_the_fittest(tmp_path, drawn_figures):
    keys = ['lr0', 'momentum', 'giou']
    rng = np.random.default_rng(0)
    x = np.column_stack((rng.random((6, 8)), rng.random((6, 3))))
    np.savetxt(tmp_path / 'evolve.txt', x, fmt='%10.4g')
    x = np.loadtxt(tmp_path / 'evolve.txt')  # as written (4 significant digits)
    best = int((0.1 * x[:, 2] + 0.9 * x[:, 3]).argmax())
    plot_evolution(keys, tmp_path / 'evolve.txt', tmp_path / 'evolve.png')
    (fig,) = drawn_figures
    for k, key in enumerate(keys):  # fitness against each hyperparameter, the fittest row's value in the title
        ax = fig.axes[k]
        xy = ax.collections[0].get_offsets()
        assert np.asarray(xy[:, 0]).tolist() == pytest.approx(x[:, 8 + k].tolist())
        assert np.asarray(xy[:, 1]).tolist() == pytest.approx((0.1 * x[:, 2] + 0.9 * x[:, 3]).tolist())
        assert ax.lines[0].get_xdata().tolist() == pytest.approx([x[best, 8 + k]])  # the '+' on the best row
        assert ax.get_title() == f'{key} = {x[best, 8 + k]:.3g}'
    with pytest.raises(ValueError, match='expected 8 results'):
        plot_evolution(keys[:2], tmp_path / 'evolve.txt', tmp_path / 'e2.png')


def test_pr_curve_pixels(tmp_path):
    # plot area: x from 90 to 990 px (recall 0..1), y from 820 down to 40 px (precision 0..1)
    px = np.linspace(0, 1, 1000)
    py = np.stack([1 - px, np.clip(1.2 - 2 * px, 0, 1)])
    out = plot_pr_curve(px, py, np.array([0.5, 0.3]), tmp_path / 'pr.png', names=['a', 'b'], classes=[0, 4])
    img = cv2.imread(str(out)).astype(int)  # BGR

    def colour_near(recall: float, precision: float, bgr: tuple) -> bool:
        x, y = round(90 + recall * 900), round(40 + (1 - precision) * 780)
        return np.abs(img[y - 2:y + 3, x - 2:x + 3] - bgr).sum(-1).min() < 60

    assert colour_near(0.3, 0.7, class_color(0)) and colour_near(0.8, 0.2, class_color(0))  # class a: p = 1 - r
    assert colour_near(0.25, 0.7, class_color(4)) and not colour_near(0.3, 0.7, class_color(4))  # class b's curve
    assert colour_near(0.5, 0.35, (255, 0, 0)) and colour_near(0.8, 0.1, (255, 0, 0))  # the mean, bold blue
    assert not colour_near(0.5, 0.9, (255, 0, 0))


def _colour_near(img: np.ndarray, x: float, y: float, bgr: tuple) -> bool:
    """Whether a pixel within 2 px of (x, y) of the curve canvas (x: 0..1 -> 90..990 px, y: 0..1 -> 820..40 px)
    has about this colour."""
    u, v = round(90 + x * 900), round(40 + (1 - y) * 780)
    return np.abs(img[v - 2:v + 3, u - 2:u + 3] - bgr).sum(-1).min() < 60


def test_metric_confidence_curve_pixels(tmp_path):
    px = np.linspace(0, 1, 1000)
    py = np.stack([1 - px, np.clip(1.2 - 2 * px, 0, 1)])  # F1 of two classes against confidence
    out = plot_mc_curve(px, py, tmp_path / 'F1_curve.png', 'F1', names=['a', 'b'], classes=[0, 4])
    img = cv2.imread(str(out)).astype(int)
    assert img.shape == (900, 1500, 3)
    assert _colour_near(img, 0.3, 0.7, class_color(0)) and _colour_near(img, 0.5, 0.2, class_color(4))
    mean = smooth(py.mean(0))  # the bold mean is smoothed as YOLOv5's
    assert mean.shape == px.shape and mean[500] == pytest.approx(py.mean(0)[500])  # straight there: unchanged
    assert _colour_near(img, 0.5, mean[500], (255, 0, 0)) and _colour_near(img, 0.8, mean[800], (255, 0, 0))
    assert not _colour_near(img, 0.5, 0.9, (255, 0, 0))
    assert (img[40:821, 1100:1500] < 128).any()  # the legend


def _cell(img: np.ndarray, g, row: int, col: int) -> np.ndarray:
    """The pixels of one matrix cell, less a 1 px margin."""
    y, x = g.top + row * g.cell, g.left + col * g.cell
    return img[y + 1:y + g.cell - 1, x + 1:x + g.cell - 1]


def test_confusion_matrix_plot_cells_and_labels(tmp_path):
    names = ['cat', 'dog', 'traffic light']
    m = np.array([[5, 0, 0, 2], [1, 4, 0, 0], [0, 0, 0, 0], [0, 0, 3, 0]])  # rows predicted, columns true
    norm = m / np.maximum(m.sum(0, keepdims=True), 1)
    out = plot_confusion_matrix(norm, names, tmp_path / 'confusion_matrix.png')
    img = cv2.imread(str(out))
    g = matrix_geometry(names + ['background'])
    assert img.shape == (g.height, g.width, 3)
    corner = _cell(img, g, 0, 0)[:3, :3].reshape(-1, 3)  # away from the number in the middle
    assert (corner == blues(5 / 6)).all()
    assert (_cell(img, g, 1, 0)[:3, :3].reshape(-1, 3) == blues(1 / 6)).all()
    assert (_cell(img, g, 3, 2)[:3, :3].reshape(-1, 3) == blues(1.0)).all()  # traffic light: all missed
    assert (_cell(img, g, 0, 3)[:3, :3].reshape(-1, 3) == blues(1.0)).all()  # background column: a false positive
    assert (_cell(img, g, 2, 2) == 255).all()  # zero: blank
    assert len(np.unique(_cell(img, g, 0, 0).reshape(-1, 3), axis=0)) > 2  # 4 classes: the value is written in
    assert (img[g.top:g.top + 4 * g.cell, :g.left - 4] < 100).any()  # row labels left of the matrix
    assert (img[g.top + 4 * g.cell + 4:, g.left:g.left + 4 * g.cell] < 100).any()  # rotated column labels below


@pytest.mark.slow
def test_confusion_matrix_plot_80_and_1_classes(tmp_path):
    from tests.conftest import COCO_NAMES

    names = COCO_NAMES.read_text().splitlines()
    norm = np.eye(81)
    norm[80, 80] = 0
    img = cv2.imread(str(plot_confusion_matrix(norm, names, tmp_path / 'cm80.png')))
    g = matrix_geometry(names + ['background'])
    assert g.cell >= 12 and img.shape == (g.height, g.width, 3) and max(img.shape) < 1600
    for k in (0, 40, 79):  # colour only: no number in the cells beyond 30 classes
        assert (_cell(img, g, k, k).reshape(-1, 3) == blues(1.0)).all()
    # one class: person and background, numbers written, the title inside the canvas
    img = cv2.imread(str(plot_confusion_matrix(np.array([[0.75, 1.0], [0.25, 0]]), ['person'], tmp_path / 'cm1.png')))
    g = matrix_geometry(['person', 'background'])
    assert img.shape == (g.height, g.width, 3) and g.cell == 160
    assert (_cell(img, g, 1, 0)[:3, :3].reshape(-1, 3) == blues(0.25)).all()
    assert len(np.unique(_cell(img, g, 0, 0).reshape(-1, 3), axis=0)) > 2
    assert (img[:, -5:] == 255).all()  # nothing cut at the right edge

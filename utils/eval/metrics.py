"""Detection metrics: matching predictions to targets, AP per class with the original's interpolation, P/R/F1 against
confidence, the confusion matrix, fitness."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)  # COCO's mAP@0.5:0.95 thresholds
PR_SCORE = 0.1  # as the original: P and R are reported at this confidence
CM_CONF, CM_IOU = 0.25, 0.45  # the confusion matrix counts detections at detect-time thresholds, as YOLOv5
_trapezoid = getattr(np, 'trapezoid', None) or np.trapz  # numpy 2 renamed trapz; requirements allow numpy 1.23


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness of results rows (n, >=4) [P, R, mAP@0.5, mAP@0.5:0.95, ...] -> (n,) 0.1*mAP@.5 + 0.9*mAP."""
    w = np.array([0.0, 0.0, 0.1, 0.9])
    return (np.asarray(x, dtype=np.float64)[:, :4] * w).sum(1)


def match_predictions(pred: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor = IOU_THRESHOLDS) -> torch.Tensor:
    """Correct-at-each-threshold matrix (n, len(iouv)) for predictions (n, 6) [xyxy, conf, cls] against labels (m, 5)
    [cls, xyxy], both in the same pixel space.

    As the original: predictions are taken in their order (NMS output, highest conf first); each takes the target
    of its own class it overlaps most; if that IoU is above iouv[0] and the target is still free, the prediction
    claims it and is correct at every threshold below that IoU. A prediction whose best target is taken is wrong,
    even if another target of its class would have matched.
    """
    from torchvision.ops import (
        box_iou,  # lazy, as in utils/eval/nms.py: test.py has imported it for NMS already
    )

    iouv = iouv.to(pred.device)
    correct = torch.zeros(pred.shape[0], iouv.numel(), dtype=torch.bool, device=pred.device)
    if not pred.shape[0] or not labels.shape[0]:
        return correct
    iou = box_iou(labels[:, 1:5], pred[:, :4])  # (m, n)
    iou = iou * (labels[:, 0:1] == pred[None, :, 5])  # targets of other classes never match
    best_iou, best_t = iou.max(0)  # (n,) per prediction: its best target of the same class
    cand = (best_iou > iouv[0]).nonzero(as_tuple=True)[0]  # candidate predictions, in confidence order
    if cand.numel():
        # greedy in prediction order = the first candidate claiming each target wins it
        _, first = np.unique(best_t[cand].cpu().numpy(), return_index=True)
        won = cand[torch.as_tensor(first, device=pred.device)]
        correct[won] = best_iou[won, None] > iouv
    return correct


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AP of one precision-recall curve by 101-point interpolation (COCO) of its precision envelope.

    Returns (ap, envelope precision, recall with sentinels). As the original: the curve is closed at
    recall min(last recall + 0.001, 1) with precision 0, and integrated with the trapezoidal rule over 101 points.
    """
    mrec = np.concatenate(([0.0], recall, [min(recall[-1] + 1e-3, 1.0)]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # precision envelope: max precision at recall >= r
    x = np.linspace(0, 1, 101)
    ap = _trapezoid(np.interp(x, mrec, mpre), x)
    return float(ap), mpre, mrec


class APResult(NamedTuple):
    """Per-class results of ap_per_class; rows follow `classes` (the classes that have targets)."""
    p: np.ndarray  # (nc,) precision at PR_SCORE
    r: np.ndarray  # (nc,) recall at PR_SCORE
    ap: np.ndarray  # (nc, niou) AP at each IoU threshold
    f1: np.ndarray  # (nc,)
    classes: np.ndarray  # (nc,) int class indices
    px: np.ndarray  # (1000,) grid in [0, 1]: recall for py, confidence for p_curve and r_curve
    py: np.ndarray  # (nc, 1000) precision envelope at IoU 0.5 on the px grid
    p_curve: np.ndarray  # (nc, 1000) precision at IoU 0.5 at each confidence threshold px (0 without predictions)
    r_curve: np.ndarray  # (nc, 1000) recall at IoU 0.5 at each confidence threshold px

    def f1_curve(self) -> np.ndarray:
        """(nc, 1000) F1 at each confidence threshold px."""
        return 2 * self.p_curve * self.r_curve / (self.p_curve + self.r_curve + 1e-16)


def ap_per_class(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
                 pr_score: float = PR_SCORE) -> APResult:
    """AP per class from tp (n, niou) bool, conf (n,), pred_cls (n,) over all images, target_cls (m,).

    Classes come from the targets only (predicted classes without any target are not scored), as the original.
    """
    tp = np.asarray(tp, dtype=np.float64)
    if tp.ndim == 1:
        tp = tp[:, None]
    conf, pred_cls, target_cls = (np.asarray(a).reshape(-1) for a in (conf, pred_cls, target_cls))
    order = np.argsort(-conf, kind='stable')
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes = np.unique(target_cls).astype(np.int64)
    nc, niou = classes.shape[0], tp.shape[1]
    ap, p, r = np.zeros((nc, niou)), np.zeros(nc), np.zeros(nc)
    px = np.linspace(0, 1, 1000)
    py, p_curve, r_curve = np.zeros((nc, px.size)), np.zeros((nc, px.size)), np.zeros((nc, px.size))
    for ci, c in enumerate(classes):
        i = pred_cls == c
        n_l = int((target_cls == c).sum())  # labels of this class
        if not i.any() or n_l == 0:
            continue
        tpc = tp[i].cumsum(0)  # (n_c, niou)
        fpc = (1 - tp[i]).cumsum(0)
        recall = tpc / (n_l + 1e-16)
        precision = tpc / (tpc + fpc)
        # conf decreases along the curve, so interpolate on -conf (np.interp needs increasing x)
        r[ci] = np.interp(-pr_score, -conf[i], recall[:, 0])
        p[ci] = np.interp(-pr_score, -conf[i], precision[:, 0])
        # as YOLOv5: above the highest confidence nothing is detected (recall 0, precision 1)
        r_curve[ci] = np.interp(-px, -conf[i], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-px, -conf[i], precision[:, 0], left=1)
        for j in range(niou):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                py[ci] = np.interp(px, mrec, mpre)
    f1 = 2 * p * r / (p + r + 1e-16)
    return APResult(p, r, ap, f1, classes, px, py, p_curve, r_curve)


class ConfusionMatrix:
    """Detection confusion matrix (nc + 1, nc + 1): rows = predicted class, columns = true class, index nc =
    background (a missed label is counted in the background row, a false detection in the background column).

    As YOLOv5: detections at or below conf are ignored; labels and detections of any class are paired where their
    IoU is above iou_thres (see _pair_once); a pair counts at [detected class, true class], so a wrong class lands
    off the diagonal. Unlike YOLOv5 v7, unmatched detections count in an image where nothing matched too.
    """

    def __init__(self, nc: int, conf: float = CM_CONF, iou_thres: float = CM_IOU):
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def process_batch(self, detections: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one image: detections (n, 6) [xyxy, conf, cls] and labels (m, 5) [cls, xyxy] in the same pixels."""
        from torchvision.ops import box_iou  # lazy, as match_predictions

        det = detections[detections[:, 4] > self.conf].float().cpu()
        labels = labels.float().cpu()
        dcls, tcls = det[:, 5].long().numpy(), labels[:, 0].long().numpy()
        cls = np.concatenate((dcls, tcls))
        bad = cls[(cls < 0) | (cls >= self.nc)]
        if len(bad):
            raise ValueError(f'class {bad[0]} is outside the confusion matrix of {self.nc} classes')
        ti, di = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if len(det) and len(labels):
            iou = box_iou(labels[:, 1:5], det[:, :4]).numpy()  # (m, n)
            ti, di = (iou > self.iou_thres).nonzero()
            order = np.argsort(-iou[ti, di], kind='stable')  # highest IoU first
            ti, di = _pair_once(ti[order], di[order])
        np.add.at(self.matrix, (dcls[di], tcls[ti]), 1)  # matched pairs
        np.add.at(self.matrix, (self.nc, np.delete(tcls, ti)), 1)  # missed labels: predicted background
        np.add.at(self.matrix, (np.delete(dcls, di), self.nc), 1)  # unmatched detections: true background

    def normalised(self) -> np.ndarray:
        """The matrix as fractions of each true class (column sums 1; an empty column stays 0)."""
        return self.matrix / np.maximum(self.matrix.sum(0, keepdims=True), 1)


def _pair_once(ti: np.ndarray, di: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As YOLOv5 v7: from (label, detection) pairs sorted by IoU, highest first, each detection keeps its best
    label, then each label its best remaining detection (a detection whose best label went elsewhere stays
    unmatched, even if it overlaps another label)."""
    keep = np.sort(np.unique(di, return_index=True)[1])  # first (best) pair of each detection, still IoU-sorted
    ti, di = ti[keep], di[keep]
    keep = np.sort(np.unique(ti, return_index=True)[1])
    return ti[keep], di[keep]

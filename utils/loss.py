"""YOLOv3 training loss: target assignment to anchors, GIoU box loss, objectness and class BCE (optionally focal)."""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.boxes import bbox_iou, decode_yolo_box, wh_iou
from utils.torch_utils import de_parallel

# build_targets' result: per [yolo] layer classes, boxes, (image, anchor, gj, gi) indices, anchors
Targets = tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, ...]], list[torch.Tensor]]


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) wrapped around an element-wise BCEWithLogitsLoss."""

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = 'none'  # the modulating factor needs the loss of every element

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """Focal-weighted BCE of logits pred against targets true (same shape), reduced as the wrapped loss."""
        loss = self.loss_fcn(pred, true)
        prob = torch.sigmoid(pred)
        p_t = true * prob + (1 - true) * (1 - prob)  # probability given to the target
        alpha_factor = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_factor * (1.0 - p_t) ** self.gamma
        if self.reduction == 'mean':
            return loss.mean()
        if self.reduction == 'sum':
            return loss.sum()
        return loss


def build_targets(p: list[torch.Tensor], targets: torch.Tensor, anchor_vecs: list[torch.Tensor], nc: int,
                  iou_t: float) -> Targets:
    """Assign targets (n, 6) [image, class, x, y, w, h] (normalised xywh) to the anchors of every [yolo] layer.

    anchor_vecs: per layer (na, 2) anchors in grid units of that layer. A target goes to every anchor of a layer
    whose width-height IoU with it exceeds iou_t (not only to the best anchor), in the grid cell holding its centre.
    Returns per layer: classes (m,), boxes (m, 4) as [x offset in cell, y offset in cell, w, h] in grid units,
    indices (image, anchor, gj, gi) and anchors (m, 2) in grid units.
    """
    nt = targets.shape[0]
    if nt and targets[:, 1].max() >= nc:
        raise ValueError(f"label class {int(targets[:, 1].max())} is out of range for a model with {nc} classes "
                         f"(classes must be 0-{nc - 1}); check the labels or the cfg's classes=")
    tcls, tbox, indices, anch = [], [], [], []
    gain = torch.ones(6, device=targets.device)
    for i, anchor_vec in enumerate(anchor_vecs):
        anchor_vec = anchor_vec.to(targets.device)  # (na, 2) in grid units
        na = anchor_vec.shape[0]
        ny, nx = p[i].shape[2:4]  # p[i]: (bs, na, ny, nx, no)
        gain[2:] = torch.tensor([nx, ny, nx, ny], device=targets.device)
        t = targets * gain  # (nt, 6) with xywh in grid units
        if nt:
            # as the original: all anchors above the IoU threshold take the target, not just the best one
            match = wh_iou(anchor_vec, t[:, 4:6]) > iou_t  # (na, nt)
            a = torch.arange(na, device=targets.device).view(na, 1).repeat(1, nt)[match]  # (m,)
            t = t.repeat(na, 1, 1)[match]  # (m, 6)
        else:
            a = torch.zeros(0, dtype=torch.long, device=targets.device)
        b, c = t[:, :2].long().T  # image, class
        gxy, gwh = t[:, 2:4], t[:, 4:6]
        gij = gxy.long()
        # clamp so a centre exactly on the right/bottom border (x = 1.0) stays inside the grid
        gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
        indices.append((b, a, gj, gi))
        tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))  # (m, 4)
        anch.append(anchor_vec[a])  # (m, 2)
        tcls.append(c)
    return tcls, tbox, indices, anch


class ComputeLoss:
    """The YOLOv3 loss of one model: takes the [yolo] layers' anchors, the class count and the hyperparameters once,
    then is called as loss_fn(predictions, targets).

    hyp: giou, obj, cls gains (cls as the loss should use it: train.py scales it by nc / 80), cls_pw, obj_pw, iou_t,
    fl_gamma. gr: objectness target = (1 - gr) + gr * GIoU; train.py ramps it 0 -> 1 during burn-in.
    """

    def __init__(self, model: nn.Module, hyp: dict[str, float], gr: float = 1.0):
        bare = de_parallel(model)
        self.anchor_vecs = [bare.module_list[j].anchor_vec.detach().clone() for j in bare.yolo_layers]
        self.scale_x_y = [float(bare.module_list[j].scale_x_y) for j in bare.yolo_layers]
        self.nc = int(bare.nc)
        self.hyp = dict(hyp)
        self.gr = gr

    def __call__(self, p: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of raw train-mode outputs p (each (bs, na, ny, nx, nc + 5)) for targets (n, 6).

        Returns (loss (1,), loss_items (4,) = [lbox, lobj, lcls, total], detached).
        """
        h, gr, nc = self.hyp, self.gr, self.nc
        device = p[0].device
        p = [pi.float() for pi in p]  # losses in fp32 even when the forward ran under autocast
        lcls = torch.zeros(1, device=device)
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        tcls, tbox, indices, anchors = build_targets(p, targets, self.anchor_vecs, nc, h['iou_t'])

        # as the original: mean reduction per layer, summed over layers, then the gains; no division by batch size
        # here (train.py scales by batch_size / 64 for accumulation)
        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h['cls_pw']], device=device))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h['obj_pw']], device=device))
        if h.get('fl_gamma', 0.0) > 0:
            bce_cls, bce_obj = FocalLoss(bce_cls, h['fl_gamma']), FocalLoss(bce_obj, h['fl_gamma'])

        for i, pi in enumerate(p):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros_like(pi[..., 0])  # (bs, na, ny, nx)
            nb = b.shape[0]
            if nb:
                ps = pi[b, a, gj, gi]  # (nb, nc + 5) predictions at the assigned anchors and cells
                # decoded as YOLOLayer does at inference (scale_x_y too); as the original, exp(t) clamped at 1e3
                pxy, pwh = decode_yolo_box(ps, anchors[i], self.scale_x_y[i], max_wh_scale=1e3)
                giou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], x1y1x2y2=False, giou=True)  # (nb,)
                lbox += (1.0 - giou).mean()
                # objectness target: 1 blended with the (non-negative) GIoU of the prediction
                tobj[b, a, gj, gi] = (1.0 - gr) + gr * giou.detach().clamp(0).to(tobj.dtype)
                if nc > 1:  # as the original: no class loss for single-class models
                    t = torch.zeros_like(ps[:, 5:])  # (nb, nc)
                    t[torch.arange(nb, device=device), tcls[i]] = 1.0
                    lcls += bce_cls(ps[:, 5:], t)
            lobj += bce_obj(pi[..., 4], tobj)

        lbox *= h['giou']
        lobj *= h['obj']
        lcls *= h['cls']
        loss = lbox + lobj + lcls
        return loss, torch.cat((lbox, lobj, lcls, loss)).detach()


LOSSES = ('original', 'darknet')  # train.py --loss


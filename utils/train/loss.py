"""YOLOv3 training loss: target assignment to anchors, GIoU box loss, objectness and class BCE (optionally focal)."""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.boxes import bbox_iou, decode_yolo_box, wh_iou
from utils.darknet.parse_config import ConfigError
from utils.torch_utils import de_parallel

# new_coords heads output probabilities (their convolution applies the logistic); the BCE losses take them back to
# logits clamped this far from 0 and 1 (float32 holds 1 - 1e-7), where Darknet's own logistic gradient vanishes too
PROB_EPS = 1e-7
# heads whose outputs the losses do not decode: training with them stops before anything is written
UNTRAINABLE_HEADS = {'region': "YOLOv2's [region] (softmax classes, boxes on anchors in grid units)",
                     'gaussian_yolo': "[Gaussian_yolo] (boxes with uncertainties)"}

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


def assign_targets(p: list[torch.Tensor], targets: torch.Tensor, anchor_vecs: list[torch.Tensor],
                   iou_t: float) -> tuple[Targets, list[torch.Tensor]]:
    """build_targets without dropping the (anchor, target) pairs below iou_t: every layer keeps all na * nt pairs in
    (anchor, target) order and a (na * nt,) bool mask of the matched ones, so no output shape depends on the data.

    Selecting the matched pairs (a boolean index) makes the host wait for the device to learn how many there are;
    ComputeLoss weights the pairs with the mask instead, which keeps a CUDA training step free of host syncs.
    Returns (build_targets' tuple over all pairs, masks). anchor_vecs must be on targets' device.
    """
    nt = targets.shape[0]
    tcls, tbox, indices, anch, masks = [], [], [], [], []
    for i, anchor_vec in enumerate(anchor_vecs):
        na = anchor_vec.shape[0]  # anchor_vec: (na, 2) in grid units
        ny, nx = p[i].shape[2:4]  # p[i]: (bs, na, ny, nx, no)
        t = targets.clone()  # (nt, 6), xywh scaled to grid units by Python numbers (no host-to-device copy)
        t[:, 2::2] *= nx
        t[:, 3::2] *= ny
        # as the original: all anchors above the IoU threshold take the target, not just the best one
        masks.append((wh_iou(anchor_vec, t[:, 4:6]) > iou_t).view(-1))  # (na * nt,)
        a = torch.arange(na, device=targets.device).repeat_interleave(nt)  # (na * nt,)
        t = t.repeat(na, 1)  # (na * nt, 6)
        b, c = t[:, :2].long().T  # image, class
        gxy, gwh = t[:, 2:4], t[:, 4:6]
        gij = gxy.long()
        # clamp so a centre exactly on the right/bottom border (x = 1.0) stays inside the grid
        gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
        indices.append((b, a, gj, gi))
        tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))  # (na * nt, 4)
        anch.append(anchor_vec[a])  # (na * nt, 2)
        tcls.append(c)
    return (tcls, tbox, indices, anch), masks


def build_targets(p: list[torch.Tensor], targets: torch.Tensor, anchor_vecs: list[torch.Tensor], nc: int,
                  iou_t: float) -> Targets:
    """Assign targets (n, 6) [image, class, x, y, w, h] (normalised xywh) to the anchors of every [yolo] layer.

    anchor_vecs: per layer (na, 2) anchors in grid units of that layer. A target goes to every anchor of a layer
    whose width-height IoU with it exceeds iou_t (not only to the best anchor), in the grid cell holding its centre.
    Returns per layer: classes (m,), boxes (m, 4) as [x offset in cell, y offset in cell, w, h] in grid units,
    indices (image, anchor, gj, gi) and anchors (m, 2) in grid units. Label classes are checked against nc where
    the dataset is read (LoadImagesAndLabels(nc=...)), not here: that check would read the device every batch.
    """
    anchor_vecs = [a.to(targets.device) for a in anchor_vecs]
    (tcls, tbox, indices, anch), masks = assign_targets(p, targets, anchor_vecs, iou_t)
    return ([c[m] for c, m in zip(tcls, masks)], [x[m] for x, m in zip(tbox, masks)],
            [tuple(x[m] for x in idx) for idx, m in zip(indices, masks)], [x[m] for x, m in zip(anch, masks)])


class ComputeLoss:
    """The YOLOv3 loss of one model: takes the [yolo] layers' anchors, the class count and the hyperparameters once,
    then is called as loss_fn(predictions, targets, gr).

    hyp: giou, obj, cls gains (cls as the loss should use it: train.py scales it by nc / 80), cls_pw, obj_pw, iou_t,
    fl_gamma. The objectness target is (1 - gr) + gr * GIoU with gr given per call (the burn-in ramps it 0 -> 1).
    A call makes no host sync on CUDA (no .item(), no boolean indexing, no tensors from Python lists): what is
    per-device (anchors, BCE pos_weight) is built once per device.
    """

    def __init__(self, model: nn.Module, hyp: dict[str, float]):
        bare = de_parallel(model)
        refuse_heads(bare, 'original', ())
        self.anchor_vecs = [bare.module_list[j].anchor_vec.detach().clone() for j in bare.yolo_layers]
        self.scale_x_y = [float(bare.module_list[j].scale_x_y) for j in bare.yolo_layers]
        # new_coords (Scaled-YOLOv4, YOLOv7): decoded as inference decodes them; objectness and classes are
        # probabilities already
        self.new_coords = [bool(bare.module_defs[j].get('new_coords', 0)) for j in bare.yolo_layers]
        self.nc = int(bare.nc)
        self.hyp = dict(hyp)
        self._per_device: dict[torch.device, tuple[list[torch.Tensor], nn.Module, nn.Module]] = {}

    def _device_parts(self, device: torch.device) -> tuple[list[torch.Tensor], nn.Module, nn.Module]:
        """(anchors, class BCE (no reduction), objectness BCE (mean)) on device, built on first use."""
        if device not in self._per_device:
            h = self.hyp
            # torch.full fills on the device; a tensor from a Python list would be a host-to-device copy
            bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.full((1,), float(h['cls_pw']), device=device),
                                           reduction='none')
            bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.full((1,), float(h['obj_pw']), device=device))
            if h.get('fl_gamma', 0.0) > 0:
                bce_cls, bce_obj = FocalLoss(bce_cls, h['fl_gamma']), FocalLoss(bce_obj, h['fl_gamma'])
            self._per_device[device] = ([a.to(device) for a in self.anchor_vecs], bce_cls, bce_obj)
        return self._per_device[device]

    def __call__(self, p: list[torch.Tensor], targets: torch.Tensor, gr: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of raw train-mode outputs p (each (bs, na, ny, nx, nc + 5)) for targets (n, 6) on p's device, with
        objectness GIoU ratio gr (1.0 after burn-in).

        Returns (loss (1,), loss_items (4,) = [lbox, lobj, lcls, total], detached).
        """
        h, nc = self.hyp, self.nc
        device = p[0].device
        anchor_vecs, bce_cls, bce_obj = self._device_parts(device)
        p = [pi.float() for pi in p]  # losses in fp32 even when the forward ran under autocast
        lcls = torch.zeros(1, device=device)
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        (tcls, tbox, indices, anchors), masks = assign_targets(p, targets, anchor_vecs, h['iou_t'])

        # as the original: mean reduction per layer (over the matched pairs), summed over layers, then the gains; no
        # division by batch size here (train.py scales by batch_size / 64 for accumulation)
        for i, pi in enumerate(p):
            b, a, gj, gi = indices[i]  # all na * nt pairs; masks[i] says which are matched
            tobj = torch.zeros(pi[..., 0].numel() + 1, device=device)  # (bs * na * ny * nx + 1,): the last is a sink
            if b.shape[0]:
                match = masks[i]
                n = match.sum().clamp(min=1)  # matched pairs (a device scalar); the mean of none is 0
                ps = pi[b, a, gj, gi]  # (na * nt, nc + 5) predictions at the pairs' anchors and cells
                # decoded as YOLOLayer does at inference (scale_x_y too); exp(t) clamped at 1e3 so a wild early
                # prediction cannot overflow
                pxy, pwh = decode_yolo_box(ps, anchors[i], self.scale_x_y[i], max_wh_scale=1e3,
                                           new_coords=self.new_coords[i])
                giou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], x1y1x2y2=False, giou=True)  # (na * nt,)
                lbox += torch.where(match, 1.0 - giou, 0.0).sum() / n
                # objectness target: 1 blended with the (non-negative) GIoU of the prediction; unmatched pairs
                # write to the sink, matched ones in the original's order (the last of a shared cell wins)
                cell = ((b * pi.shape[1] + a) * pi.shape[2] + gj) * pi.shape[3] + gi
                tobj[torch.where(match, cell, tobj.shape[0] - 1)] = (1.0 - gr) + gr * giou.detach().clamp(0)
                if nc > 1:  # as the original: no class loss for single-class models
                    t = torch.zeros_like(ps[:, 5:])  # (na * nt, nc)
                    t[torch.arange(t.shape[0], device=device), tcls[i]] = 1.0
                    logits = _logits(ps[:, 5:], self.new_coords[i])
                    lcls += torch.where(match[:, None], bce_cls(logits, t), 0.0).sum() / (n * nc)
            lobj += bce_obj(_logits(pi[..., 4], self.new_coords[i]), tobj[:-1].view(pi.shape[:4]))

        lbox *= h['giou']
        lobj *= h['obj']
        lcls *= h['cls']
        loss = lbox + lobj + lcls
        return loss, torch.cat((lbox, lobj, lcls, loss)).detach()


def _logits(x: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """x as logits for BCEWithLogitsLoss: unchanged, or the logit of probabilities (a new_coords head), whose
    gradient through the head's logistic is then BCE's own (p - target)."""
    return torch.logit(x, eps=PROB_EPS) if probabilities else x


def refuse_heads(model: nn.Module, loss: str, trains: tuple[str, ...]) -> None:
    """Raise ConfigError naming the cfg, line and layer of the first detection head that loss cannot train (any
    [region] or [Gaussian_yolo] head whose type is not in trains)."""
    for j, mdef in enumerate(model.module_defs):
        kind = mdef.get('type')
        if kind in UNTRAINABLE_HEADS and kind not in trains:
            raise ConfigError(f"{model.cfg_path}:{mdef.get('line', '?')}: layer {j}: {UNTRAINABLE_HEADS[kind]} heads "
                              f"cannot be trained with --loss {loss}; "
                              + ("use --loss darknet (Darknet's own loss for this head)" if kind == 'region'
                                 else 'no loss here trains them yet')
                              + ' (detect.py, test.py and export run them)')


LOSSES = ('original', 'darknet')  # train.py --loss


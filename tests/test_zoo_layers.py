"""The layers and heads Darknet's cfg zoo needs, on tiny inline cfgs: each against the formula in Darknet's source
(computed here independently, element by element), weights round trips, and freezing (stopbackward)."""
from __future__ import annotations

import math

import pytest
import torch

from models import Darknet
from utils.darknet.layers import MaxPoolDepth, ReorgOld, make_activation
from utils.darknet.parse_config import ConfigError
from utils.darknet.weights import (
    darknet_value_count,
    load_darknet_weights,
    save_weights,
)

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def conv(filters: int, act: str = 'linear', size: int = 1, bn: int = 0, extra: str = '') -> str:
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride=1\npad=1\n"
            f"activation={act}\n{extra}")


def randomise(model: Darknet, seed: int = 0) -> Darknet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype.is_floating_point and 'anchors' not in name:
                t.copy_(torch.rand(t.shape, generator=g) * (0.5 if 'running_var' in name else 1) +
                        (0.5 if 'running_var' in name else -0.5))
    return model


def test_new_coords_yolo_decode_has_no_sigmoid():
    # yolo_layer.c: new_coords heads take the conv's (already logistic) outputs as they are:
    # x = (col + t*sxy - (sxy-1)/2) / lw, w = 4 t^2 anchor / netw, objectness and classes unchanged
    cfg = NET + conv(2 * 7, 'logistic') + "[yolo]\nmask=0,1\nanchors=4,6, 10,12\nclasses=2\nnum=2\nnew_coords=1\n" \
        "scale_x_y=2.0\n"
    m = randomise(Darknet(cfg)).eval()
    x = torch.rand(1, 3, 32, 32)
    io, (p,) = m(x)
    raw = torch.sigmoid(m.module_list[0].Conv2d(x))  # (1, 14, 32, 32), the map the head reads
    assert torch.allclose(p.permute(0, 1, 4, 2, 3).reshape(1, 14, 32, 32), raw)
    io = io.view(1, 2, 32, 32, 7)
    for a, (aw, ah) in enumerate([(4, 6), (10, 12)]):
        for row, col in ((0, 0), (5, 17), (31, 31)):
            t = raw[0, a * 7:(a + 1) * 7, row, col].tolist()
            want = [(col + t[0] * 2 - 0.5), (row + t[1] * 2 - 0.5), 4 * t[2] ** 2 * aw, 4 * t[3] ** 2 * ah,
                    t[4], t[5], t[6]]
            assert io[0, a, row, col].tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_region_decode():
    # region_layer.c get_region_boxes: x = (col + logistic(tx)) / l.w, w = exp(tw) * anchor / l.w (grid units),
    # objectness logistic, classes softmax; in pixels at a 32 x 32 input with a 2 x 2 grid (stride 16)
    cfg = NET + "[maxpool]\nsize=16\nstride=16\n" + conv(2 * 8) + \
        "[region]\nanchors=1.5,2, 0.5,0.75\nclasses=3\nnum=2\nsoftmax=1\ncoords=4\n"
    m = randomise(Darknet(cfg)).eval()
    x = torch.rand(1, 3, 32, 32)
    io, _ = m(x)
    raw = m.module_list[1](m.module_list[0](x))[0]  # (16, 2, 2)
    io = io.view(2, 2, 2, 8)
    for a, (aw, ah) in enumerate([(1.5, 2), (0.5, 0.75)]):
        for row in range(2):
            for col in range(2):
                t = raw[a * 8:(a + 1) * 8, row, col].tolist()
                e = [math.exp(v) for v in t[5:]]
                want = [(col + sig(t[0])) / 2 * 32, (row + sig(t[1])) / 2 * 32, math.exp(t[2]) * aw / 2 * 32,
                        math.exp(t[3]) * ah / 2 * 32, sig(t[4])] + [v / sum(e) for v in e]
                assert io[a, row, col].tolist() == pytest.approx(want, rel=1e-5)


def test_gaussian_yolo_decode_and_score():
    # gaussian_yolo_layer.c: channels x, σx, y, σy, w, σw, h, σh, obj, classes; score = obj * cls * (1 - mean σ)
    cfg = NET + conv(1 * 11) + "[Gaussian_yolo]\nmask=0\nanchors=8,9\nclasses=2\nnum=1\n"
    m = randomise(Darknet(cfg)).eval()
    x = torch.rand(1, 3, 32, 32)
    io, _ = m(x)
    raw = m.module_list[0](x)[0]
    for row, col in ((0, 0), (3, 30)):
        t = raw[:, row, col].tolist()
        uc = sum(sig(t[k]) for k in (1, 3, 5, 7)) / 4
        want = [col + sig(t[0]), row + sig(t[2]), math.exp(t[4]) * 8, math.exp(t[6]) * 9, sig(t[8]) * (1 - uc),
                sig(t[9]), sig(t[10])]
        assert io[0, row * 32 + col].tolist() == pytest.approx(want, rel=1e-5)


def reorg_cpu_forward0(x: torch.Tensor, s: int) -> torch.Tensor:
    """Darknet's reorg_cpu(x, w, h, c, batch, s, forward=0, out), loop by loop, on flat memory."""
    b, c, h, w = x.shape
    flat, out = x.flatten().tolist(), [0.0] * x.numel()
    in_c = c // (s * s)
    for bb in range(b):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * bb))
                    c2, offset = k % in_c, k // in_c
                    w2, h2 = i * s + offset % s, j * s + offset // s
                    out[in_index] = flat[w2 + w * s * (h2 + h * s * (c2 + in_c * bb))]
    return torch.tensor(out).view(b, c * s * s, h // s, w // s)


def test_old_reorg_matches_reorg_cpu():
    x = torch.randn(2, 8, 4, 6)
    assert torch.equal(ReorgOld(2)(x), reorg_cpu_forward0(x, 2))


def test_maxpool_depth():
    x = torch.randn(1, 7, 3, 3)
    y = MaxPoolDepth(3)(x)
    for g in range(3):  # channels g, g + 3, g + 6 (if present)
        assert torch.equal(y[0, g], torch.stack([x[0, k] for k in range(g, 7, 3)]).amax(0))


def test_scale_channels_and_sam():
    cfg = NET + conv(4, 'leaky', 3) + "[avgpool]\n" + conv(4, 'logistic') + "[scale_channels]\nfrom=-3\n" + \
        conv(4, 'logistic') + "[sam]\nfrom=-2\n" + conv(1, 'logistic') + "[scale_channels]\nfrom=-2\nscale_wh=1\n"
    m = randomise(Darknet(cfg)).eval()
    x = torch.rand(1, 3, 32, 32)
    outs = []
    for i, mod in enumerate(m.module_list):
        if i in (3, 5, 7):
            outs.append(mod(outs[-1], outs))
        else:
            outs.append(mod(outs[-1] if outs else x))
    assert torch.allclose(outs[3], outs[0] * outs[2])  # per channel: (1,4,1,1) * (1,4,32,32)
    assert torch.allclose(outs[5], outs[4] * outs[3])
    assert torch.allclose(outs[7], outs[5] * outs[6])  # per position: (1,1,32,32)


@pytest.mark.parametrize('wtype, norm', [('per_feature', 'none'), ('per_channel', 'relu'),
                                         ('per_channel', 'softmax'), ('per_feature', 'softmax')])
def test_weighted_shortcut_formula_and_weights_round_trip(tmp_path, wtype, norm):
    cfg = NET + conv(4, 'leaky', 3) + conv(4, 'leaky', 3) + conv(6, 'leaky', 3) + \
        f"[shortcut]\nfrom=-2,-3\nweights_type={wtype}\nweights_normalization={norm}\nactivation=linear\n"
    m = randomise(Darknet(cfg), 1).eval()
    sc = m.module_list[3]
    assert sc.weight.shape == ((3, 6) if wtype == 'per_channel' else (3, 1))
    x = torch.rand(1, 3, 32, 32)
    a = m.module_list[0](x)
    b = m.module_list[1](a)
    c = m.module_list[2](b)
    y = sc(c, [a, b, c])
    w = sc.weight.detach()
    for ch in range(6):  # shortcut_multilayer_cpu: eps 1e-4 in the normaliser; 4-channel inputs add to channels < 4
        ws = w[:, ch if wtype == 'per_channel' else 0].tolist()
        if norm == 'relu':
            ws = [max(v, 0) / (1e-4 + sum(max(u, 0) for u in ws)) for v in ws]
        elif norm == 'softmax':
            mx = max(ws)
            ws = [math.exp(v - mx) / (1e-4 + sum(math.exp(u - mx) for u in ws)) for v in ws]
        want = c[0, ch] * ws[0] + ((b[0, ch] * ws[1] + a[0, ch] * ws[2]) if ch < 4 else 0)
        assert torch.allclose(y[0, ch], want, atol=1e-6)
    # .weights: three convolutions then the shortcut's (inputs x channels) values; written back byte-identical
    n = 3 * 4 * 9 + 4 + 4 * 4 * 9 + 4 + 6 * 4 * 9 + 6 + w.numel()
    assert darknet_value_count(m) == n
    save_weights(m, tmp_path / 'a.weights')
    m2 = Darknet(cfg)
    load_darknet_weights(m2, tmp_path / 'a.weights')
    assert torch.equal(m2.module_list[3].weight, sc.weight)
    save_weights(m2, tmp_path / 'b.weights')
    assert (tmp_path / 'a.weights').read_bytes() == (tmp_path / 'b.weights').read_bytes()


def test_dilated_shared_convolution_trident():
    # Darknet pads a dilated convolution by pad * dilation; a share_index layer reuses the weights at its own
    # dilation and has none of its own in .weights
    cfg = NET + conv(4, 'leaky', 3) + conv(4, 'linear', 3, extra='dilation=1\n') + "[route]\nlayers=-2\n" + \
        conv(4, 'linear', 3, extra='dilation=2\nshare_index=-2\n')
    m = randomise(Darknet(cfg)).eval()
    x = torch.rand(1, 3, 32, 32)
    a = m.module_list[0](x)
    src = m.module_list[1].Conv2d
    y = m.module_list[3](a)
    assert y.shape == (1, 4, 32, 32)
    assert torch.allclose(y, torch.nn.functional.conv2d(a, src.weight, src.bias, 1, 2, 2))
    assert darknet_value_count(m) == 3 * 4 * 9 + 4 + 4 * 4 * 9 + 4


def darknet_activation(name: str, x: float) -> float:
    """Darknet's activate() / activate_array_* for one value (activations.h), in float64."""
    sig = 1 / (1 + math.exp(-x))
    softplus = x if x > 20 else math.exp(x) if x < -20 else math.log(math.exp(x) + 1)
    n = math.floor(x)
    return {
        'logistic': sig, 'loggy': 2 * sig - 1, 'relu': max(x, 0), 'relu6': min(max(x, 0), 6),
        'elu': x if x >= 0 else math.exp(x) - 1, 'selu': 1.0507 * x if x >= 0 else 1.0507 * 1.6732 * (math.exp(x) - 1),
        'gelu': 0.5 * x * (1 + math.tanh(0.797885 * x + 0.035677 * x ** 3)), 'relie': x if x > 0 else 0.01 * x,
        'ramp': x * (x > 0) + 0.1 * x, 'linear': x, 'tanh': 2 / (1 + math.exp(-2 * x)) - 1,
        'plse': 0.01 * (x + 4) if x < -4 else 0.01 * (x - 4) + 1 if x > 4 else 0.125 * x + 0.5,
        'leaky': x if x > 0 else 0.1 * x, 'revleaky': x if x > 0 else 0.1 * x,
        'stair': math.floor(x / 2) if n % 2 == 0 else x - n + math.floor(x / 2),
        'hardtan': min(max(x, -1), 1), 'lhtan': 0.001 * x if x < 0 else 0.001 * (x - 1) + 1 if x > 1 else x,
        'swish': x * sig, 'mish': x * math.tanh(softplus),
        'hard_mish': x if x > 0 else x * x / 2 + x if x > -2 else 0}[name]


@pytest.mark.parametrize('name', ['logistic', 'loggy', 'relu', 'relu6', 'elu', 'selu', 'gelu', 'relie', 'ramp',
                                  'linear', 'tanh', 'plse', 'leaky', 'revleaky', 'stair', 'hardtan', 'lhtan',
                                  'swish', 'mish', 'hard_mish'])
def test_activation_formulas(name):
    xs = [-30.0, -7.5, -4.0, -2.5, -1.5, -1.0, -0.3, 0.0, 0.4, 1.0, 1.7, 3.0, 4.5, 6.5, 25.0]
    got = make_activation(name)(torch.tensor(xs)).tolist()
    assert got == pytest.approx([darknet_activation(name, x) for x in xs], rel=2e-6, abs=2e-6)


def test_normalize_channels_activations():
    x = torch.randn(2, 5, 3, 4)
    pos = x.clamp(min=0)
    assert torch.allclose(make_activation('normalize_channels')(x), pos / (pos.sum(1, keepdim=True) + 1e-4))
    e = torch.exp(x)
    assert torch.allclose(make_activation('normalize_channels_softmax')(x), e / (e.sum(1, keepdim=True) + 1e-4))
    e = torch.exp(x - x.amax(1, keepdim=True))
    assert torch.allclose(make_activation('normalize_channels_softmax_maxval')(x),
                          e / (e.sum(1, keepdim=True) + 1e-4))


def test_route_without_layers_names_the_line(tmp_path):
    (tmp_path / 'r.cfg').write_text(NET + "[route]\ngroups=1\n")
    with pytest.raises(ConfigError, match=r"r\.cfg:5: layer 0 \[route\] has no 'layers'"):
        Darknet(tmp_path / 'r.cfg')


def grads_of(m: Darknet, x: torch.Tensor) -> list[bool]:
    m.zero_grad(set_to_none=True)
    sum(p.sum() for p in m(x)).backward()
    return [any(p.grad is not None for p in mod.parameters()) for mod in m.module_list[:4]]


def test_stopbackward_1_freezes_layers_up_to_it():
    cfg = NET + conv(4, 'leaky', 3, 1) + conv(4, 'leaky', 3, 1) + conv(4, 'leaky', 3, 1, 'stopbackward=1\n') + \
        conv(1 * 6, 'linear') + "[yolo]\nmask=0\nanchors=4,4\nclasses=1\nnum=1\n"
    m = Darknet(cfg).train()
    assert [all(not p.requires_grad for p in mod.parameters()) for mod in m.module_list[:4]] == \
        [True, True, True, False]
    # layers before the stopbackward layer normalise with their running statistics (Darknet builds them train=0)
    assert [mod.BatchNorm2d.training for mod in m.module_list[:3]] == [False, False, True]
    assert grads_of(m, torch.rand(2, 3, 32, 32)) == [False, False, False, True]


def test_stopbackward_n_freezes_for_the_first_n_iterations():
    cfg = NET.replace('[net]\n', '[net]\nbatch=2\n') + conv(4, 'leaky', 3, 1) + \
        conv(4, 'leaky', 3, 1, 'stopbackward=2\n') + conv(4, 'leaky', 3, 1) + \
        conv(1 * 6, 'linear') + "[yolo]\nmask=0\nanchors=4,4\nclasses=1\nnum=1\n"
    m = Darknet(cfg).train()
    assert all(p.requires_grad for p in m.parameters())  # in the optimizer from the start
    x = torch.rand(2, 3, 32, 32)
    assert grads_of(m, x) == [False, False, True, True]  # iteration 0 (seen 0 -> 2)
    assert grads_of(m, x) == [False, False, True, True]  # iteration 1 (seen 2 -> 4)
    assert grads_of(m, x) == [True, True, True, True]  # iteration 2: Darknet's `stopbackward > iteration` is over


ALL_NEW = (NET.replace('width=32\nheight=32', 'width=64\nheight=64') + conv(8, 'mish', 3, 1) +
           "[maxpool]\nsize=2\nstride=2\n" + conv(8, 'swish', 3, 1) + conv(8, 'hard_mish', 3, 1) +
           "[shortcut]\nfrom=-2,-3\nweights_type=per_channel\nweights_normalization=softmax\n" +
           "[avgpool]\n" + conv(8, 'logistic') + "[scale_channels]\nfrom=-3\n" + conv(8, 'logistic') +
           "[sam]\nfrom=-2\n" + "[maxpool]\nmaxpool_depth=1\nout_channels=4\n" + "[reorg]\nstride=2\n" +
           conv(4 * 2, 'gelu', 3, 1, 'dilation=2\n') + "[route]\nlayers=-1\ngroups=2\ngroup_id=1\n" +
           conv(2 * 7, 'logistic') + "[yolo]\nmask=0,1\nanchors=8,8, 16,16\nclasses=2\nnum=2\nnew_coords=1\n"
           "scale_x_y=2\n" + "[route]\nlayers=-3\n" + conv(1 * 11, 'linear') +
           "[Gaussian_yolo]\nmask=0\nanchors=8,9\nclasses=2\nnum=1\n" + "[route]\nlayers=-6\n" +
           conv(2 * 7, 'linear') + "[region]\nanchors=1,1, 2,2\nclasses=2\nnum=2\nsoftmax=1\n")


def test_all_new_layers_build_round_trip_and_run(tmp_path):
    m = randomise(Darknet(ALL_NEW), 3).eval()
    assert [m.module_list[i].kind for i in m.yolo_layers] == ['yolo', 'gaussian_yolo', 'region']
    io, ps = m(torch.rand(2, 3, 64, 64))
    assert io.shape == (2, 2 * 16 * 16 + 16 * 16 + 2 * 16 * 16, 7) and torch.isfinite(io).all()
    assert [tuple(p.shape) for p in ps] == [(2, 2, 16, 16, 7), (2, 1, 16, 16, 11), (2, 2, 16, 16, 7)]
    save_weights(m, tmp_path / 'a.weights')
    m2 = Darknet(ALL_NEW)
    load_darknet_weights(m2, tmp_path / 'a.weights')
    save_weights(m2, tmp_path / 'b.weights')
    assert (tmp_path / 'a.weights').read_bytes() == (tmp_path / 'b.weights').read_bytes()


@pytest.mark.slow
def test_all_new_layers_export_to_onnx(tmp_path):
    from utils.eval.export import check_onnx, export_onnx
    m = randomise(Darknet(ALL_NEW), 3).eval()
    export_onnx(m, tmp_path / 'm.onnx', (64, 64), dynamic=True)
    assert check_onnx(m, tmp_path / 'm.onnx', [(1, 64, 64), (2, 96, 64)]) < 1e-4


@pytest.mark.parametrize('head', ["[Gaussian_yolo]\nmask=0,1\nanchors=8,9, 10,12\nclasses={nc}\nnum=2\n",
                                  "[region]\nanchors=1,1, 2,2\nclasses={nc}\nnum=2\nsoftmax=1\n"])
def test_weights_of_other_classes_load_into_gaussian_and_region_heads(tmp_path, head):
    from utils.train.transfer import load_weights
    extra = 9 if 'Gaussian' in head else 5

    def cfg(nc: int) -> str:
        return NET + conv(4, 'leaky', 3, 1) + conv(2 * (nc + extra)) + head.format(nc=nc)
    src = randomise(Darknet(cfg(3)), 5)
    save_weights(src, tmp_path / 's.weights')
    dst = Darknet(cfg(1))
    load_weights(dst, tmp_path / 's.weights', verbose=False)
    # same class names unknown -> heads of another class count stay fresh; the body loads
    assert torch.equal(dst.module_list[0].Conv2d.weight, src.module_list[0].Conv2d.weight)
    assert dst.module_list[1].Conv2d.weight.shape[0] == 2 * (1 + extra)


ZOO_REFUSED = {'tiny-yolo_xnor.cfg': 'xnor', 'yolov3-tiny_xnor.cfg': 'xnor', 'yolo9000.cfg': 'tree',
               'yolov3-tiny_occlusion_track.cfg': '[crnn]', 'yolov4-tiny_contrastive.cfg': '[local_avgpool]',
               'cspx-p7-mish.cfg': 'num=16'}


@pytest.mark.slow
def test_darknet_zoo_builds_and_runs_or_stops_in_one_line():
    from tests.conftest import SHARED
    zoo = sorted((SHARED / 'darknet-zoo').glob('*.cfg'))
    assert len(zoo) == 54
    for f in zoo:
        if f.name in ZOO_REFUSED:
            with pytest.raises(ConfigError) as e:
                Darknet(f, log_cfg=False)
            msg = str(e.value)
            assert msg.startswith(str(f)) and '\n' not in msg and ZOO_REFUSED[f.name] in msg, msg
            continue
        # built and run on the meta device: every shape is checked, no arithmetic (the layers' values are tested
        # above and against Darknet by tools/darknet_harness); 128: the smallest size all take (cspx-p7: stride 128)
        with torch.device('meta'), torch.no_grad():
            m = Darknet(f, log_cfg=False).eval()
            io, maps = m(torch.zeros(1, 3, 128, 128))
        assert io.shape[0] == 1 and io.shape[2] == 5 + m.nc and len(maps) == len(m.yolo_layers) > 0, f.name

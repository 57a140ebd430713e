"""The Darknet cfg parser on small inline cfgs: typing, validation and error messages."""
from __future__ import annotations

import pytest

from tests.conftest import REF_CFG
from utils.darknet.parse_config import ConfigError, parse_cfg_text, parse_model_cfg

NET = "[net]\nwidth=416\nheight=416\nchannels=3\nmomentum=0.9\nsteps=400000,450000\nscales=.1,.1\n"


def test_types():
    text = NET + """
# a comment
[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky   # trailing comment

[yolo]
mask = 1,2,3
anchors = 10,14,  23,27,  37,58,  81,82
classes=80
num=4
jitter=.3
scale_x_y = 1.05
iou_loss=ciou

[route]
layers = -1, 0
"""
    net, conv, yolo, route = parse_cfg_text(text, 'inline.cfg')
    assert net == {'type': 'net', 'line': 1, 'width': 416, 'height': 416, 'channels': 3, 'momentum': 0.9,
                   'steps': [400000, 450000], 'scales': [0.1, 0.1]}
    assert conv['filters'] == 16 and isinstance(conv['filters'], int) and conv['activation'] == 'leaky'
    assert conv['line'] == 10
    assert yolo['mask'] == [1, 2, 3]
    assert yolo['anchors'] == [(10.0, 14.0), (23.0, 27.0), (37.0, 58.0), (81.0, 82.0)]
    assert yolo['jitter'] == pytest.approx(0.3) and yolo['scale_x_y'] == pytest.approx(1.05)
    assert yolo['iou_loss'] == 'ciou'
    assert route['layers'] == [-1, 0]


def test_crlf_and_header_spacing():
    sections = parse_cfg_text(NET.replace('\n', '\r\n') + "[maxpool] \r\nsize=2\r\nstride=1\r\n", 'crlf.cfg')
    assert sections[1] == {'type': 'maxpool', 'line': 8, 'size': 2, 'stride': 1}


def test_misspelled_key_names_file_line_section_key():
    with pytest.raises(ConfigError) as e:
        parse_cfg_text(NET + "[convolutional]\nfilters=16\nsise=3\n", 'my.cfg')
    msg = str(e.value)
    assert msg.startswith('my.cfg:10:'), msg
    assert "'sise'" in msg and '[convolutional]' in msg and 'line 8' in msg


@pytest.mark.parametrize('body, parts', [
    ("[convolutional]\nfilters=sixteen\n", ["my.cfg:9:", "'filters'", "sixteen"]),
    ("[convolutional]\nactivation=leakyy\n", ["my.cfg:9:", "leakyy"]),
    ("[yolo]\nanchors=10,13,x\n", ["my.cfg:9:", "'x'"]),
    ("[convlutional]\nfilters=3\n", ["my.cfg:8:", "[convlutional]"]),
    ("[convolutional]\nfilters=3\nxnor=1\n", ["my.cfg:10:", "[convolutional]", "xnor=1", "out of scope"]),
    ("[crnn]\nsize=3\n", ["my.cfg:8:", "[crnn]", "out of scope"]),
    ("[region]\ntree=data/9k.tree\n", ["my.cfg:9:", "[region]", "tree", "out of scope"]),
    ("[convolutional]\nfilters 3\n", ["my.cfg:9:", "key=value"]),
])
def test_bad_values_and_sections(body, parts):
    with pytest.raises(ConfigError) as e:
        parse_cfg_text(NET + body, 'my.cfg')
    for p in parts:
        assert p in str(e.value)


def test_must_start_with_net_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match='must start with a \\[net\\]'):
        parse_cfg_text("[convolutional]\nfilters=3\n", 'x.cfg')
    with pytest.raises(ConfigError, match='nope.cfg: cfg file not found'):
        parse_model_cfg(tmp_path / 'nope.cfg')


@pytest.mark.slow
def test_every_reference_cfg_parses():
    files = sorted(REF_CFG.glob('*.cfg'))
    assert len(files) == 20
    for f in files:
        sections = parse_model_cfg(f)
        assert sections[0]['type'] == 'net'
        assert any(s['type'] == 'yolo' for s in sections), f


def test_with_values_changes_only_the_values_asked_for():
    from utils.darknet.parse_config import with_values
    text = ('[net]\r\nwidth=64\r\n[convolutional]\r\nfilters = 255  # head\r\nsize=1\r\n'
            '[yolo]\r\nmask=0,1,2\r\nanchors=10,14, 23,27, 37,58\r\nclasses=80\r\n')
    new = with_values(text, {0: {'filters': 18}, 1: {'classes': 1}}, 'x.cfg')
    assert new == text.replace('filters = 255  # head', 'filters = 18  # head').replace('classes=80', 'classes=1')
    with pytest.raises(ConfigError, match=r"x\.cfg:3: layer 0 \[convolutional\] has no 'groups'"):
        with_values(text, {0: {'groups': 2}}, 'x.cfg')


def test_repeated_key_first_wins_with_a_warning():
    warnings: list[str] = []
    conv = parse_cfg_text(NET + "[convolutional]\nfilters=3\nfilters=4\n", 'my.cfg', warnings)[1]
    assert conv['filters'] == 3  # Darknet's option_find returns the first
    assert len(warnings) == 1 and warnings[0].startswith('my.cfg:10:') and 'filters' in warnings[0]


def test_darknet_anchor_reading():
    warnings: list[str] = []
    yolo = parse_cfg_text(NET + "[yolo]\nanchors=1,2, 3,4  5,6, 7\n", 'a.cfg', warnings)[1]
    # blanks deleted, then atof per comma-separated item: '4  5' reads 45; 6 numbers left
    assert yolo['anchors'] == [(1, 2), (3, 45), (6, 7)]
    assert len(warnings) == 1 and 'two numbers' in warnings[0]
    yolo = parse_cfg_text(NET + "[yolo]\nanchors=1,2, 3\n", 'a.cfg', warnings)[1]
    assert yolo['anchors'] == [(1, 2), (3, 0.5)] and 'odd' in warnings[-1]


def test_every_darknet_key_is_accepted_and_training_keys_are_listed():
    from utils.darknet.parse_config import unused_keys
    text = (NET + "batch=64\nsubdivisions=16\nema_alpha=0.9998\nmax_epochs=300\n"
            "[convolutional]\nfilters=3\nsize=1\nstopbackward=800\nstream=1\n"
            "[yolo]\nmask=0\nanchors=1,2\nclasses=1\nnew_coords=1\nmax=200\nembedding_layer=-2\n")
    warnings: list[str] = []
    defs = parse_cfg_text(text, 'k.cfg', warnings)
    assert defs[1]['stopbackward'] == 800 and defs[2]['new_coords'] == 1
    assert 'max_epochs' not in defs[0] and 'Darknet does not read it' in warnings[0]
    # stopbackward=800 counts Darknet's iterations in [net] batch images: batch is used, so not listed
    assert unused_keys(defs) == {'net': ['ema_alpha', 'momentum', 'scales', 'steps', 'subdivisions'],
                                 'convolutional': ['stream'], 'yolo': ['embedding_layer', 'max']}
    defs = parse_cfg_text(text.replace('stopbackward=800', 'stopbackward=1'), 'k.cfg')  # frozen for good: no count
    assert unused_keys(defs)['net'] == ['batch', 'ema_alpha', 'momentum', 'scales', 'steps', 'subdivisions']


@pytest.mark.parametrize('key, value', [('antialiasing', 1), ('binary', 1), ('dontload', 1), ('sway', 1)])
def test_keys_only_at_darknets_default(key, value):
    parse_cfg_text(NET + f"[convolutional]\nfilters=3\n{key}=0\n", 'd.cfg')
    with pytest.raises(ConfigError, match=rf"d\.cfg:10: \[convolutional\].*{key}={value}"):
        parse_cfg_text(NET + f"[convolutional]\nfilters=3\n{key}={value}\n", 'd.cfg')


@pytest.mark.slow
def test_darknet_zoo_parses_or_stops_with_one_line():
    from tests.conftest import SHARED
    zoo = sorted((SHARED / 'darknet-zoo').glob('*.cfg'))
    assert len(zoo) == 54
    refused = {}
    for f in zoo:
        try:
            parse_model_cfg(f)
        except ConfigError as e:
            assert '\n' not in str(e) and str(e).startswith(str(f))
            refused[f.name] = str(e)
    assert sorted(refused) == ['tiny-yolo_xnor.cfg', 'yolo9000.cfg', 'yolov3-tiny_occlusion_track.cfg',
                               'yolov3-tiny_xnor.cfg', 'yolov4-tiny_contrastive.cfg']

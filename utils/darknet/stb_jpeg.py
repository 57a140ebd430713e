"""JPEG pixels as stb_image (v2.30) decodes them: what Darknet built without OpenCV feeds its network.

stb's integer IDCT, its chroma upsampling and its fixed-point YCbCr -> RGB differ from libjpeg-turbo's (OpenCV) by one
level on a few percent of the pixels, enough to flip a box near a threshold. Entropy decoding is lossless, so the
quantized coefficients and tables come from libjpeg (the `jpeglib` package); everything after that is stb's arithmetic,
vectorised over all blocks and rows:
- dequantize into int16 (stb stores coefficient x table entry in a `short`), then stbi__idct_block: two 1-D passes
  in int32 with 12-bit constants, 2 extra bits kept between the passes, +128 and a clamp at the end (its SSE2 kernel,
  which runs on x86-64, is bit-identical as stb documents; only coefficients no encoder writes, which overflow C's int
  or the kernel's 16-bit lanes, could differ);
- upsampling driven by load_jpeg_image's per-row line0/line1/ystep state; 2x1 (including the right edge, which stb
  weights 3:1 towards the second-last sample), 1x2, 2x2 ("fancy" triangle filters) and nearest for other ratios;
- stbi__YCbCr_to_RGB_row (Darknet asks for 3 channels, and stb's SIMD colour kernel only handles 4, so the scalar
  arithmetic is what runs), Adobe/RGB-id colour, grayscale replicated, CMYK and YCCK (Adobe transform 0 / 2) via
  stbi__blinn_8x8.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

try:
    import jpeglib
except ImportError:  # the caller decides what to do without it (darknet_post falls back to OpenCV with a warning)
    jpeglib = None

PIP_INSTALL = 'pip install jpeglib'
SOF_STB = {0xC0: False, 0xC1: False, 0xC2: True}  # the frame types stb decodes -> progressive


class StbJpegError(ValueError):
    """A JPEG that stb_image would not decode (Darknet would print 'Cannot load image' and use a blank 10x10)."""


def is_jpeg(path: str | Path) -> bool:
    """Whether the file starts with a JPEG SOI marker (stb picks its decoder by content, not by extension)."""
    try:
        with open(path, 'rb') as f:
            return f.read(3) == b'\xff\xd8\xff'
    except OSError:  # the reader's own error names the file
        return False


def _f2f(x: float) -> int:
    """stbi__f2f: (int)(x * 4096 + 0.5), the float product rounded once in double, truncated towards zero."""
    return int(float(np.float32(x) * np.float32(4096)) + 0.5)


_C = {f'c{i}': _f2f(v) for i, v in enumerate((0.5411961, -1.847759065, 0.765366865, 1.175875602, 0.298631336,
                                               2.053119869, 3.072711026, 1.501321110, -0.899976223, -2.562915447,
                                               -1.961570560, -0.390180644))}


def _idct_1d(s: list[np.ndarray]) -> list[np.ndarray]:
    """STBI__IDCT_1D on its 8 int32 inputs: its 8 outputs before the rounding bias and the shift (int32 wraps as C's
    int does on x86)."""
    c = _C
    p1 = (s[2] + s[6]) * c['c0']
    t2 = p1 + s[6] * c['c1']
    t3 = p1 + s[2] * c['c2']
    t0 = (s[0] + s[4]) * 4096
    t1 = (s[0] - s[4]) * 4096
    x0, x3, x1, x2 = t0 + t3, t0 - t3, t1 + t2, t1 - t2
    o7, o5, o3, o1 = s[7], s[5], s[3], s[1]
    p3, p4, p1, p2 = o7 + o3, o5 + o1, o7 + o1, o5 + o3
    p5 = (p3 + p4) * c['c3']
    p1 = p5 + p1 * c['c8']
    p2 = p5 + p2 * c['c9']
    p3 = p3 * c['c10']
    p4 = p4 * c['c11']
    t0 = o7 * c['c4'] + p1 + p3
    t1 = o5 * c['c5'] + p2 + p4
    t2 = o3 * c['c6'] + p2 + p3
    t3 = o1 * c['c7'] + p1 + p4
    return [x0 + t3, x1 + t2, x2 + t1, x3 + t0, x3 - t0, x2 - t1, x1 - t2, x0 - t3]


def idct_planes(coef: np.ndarray, qt: np.ndarray) -> np.ndarray:
    """stb's dequantize + stbi__idct_block on every block at once. coef: (bh, bw, 8, 8) int16 quantized coefficients
    (row = vertical frequency), qt: (8, 8) in the same order -> (bh * 8, bw * 8) uint8 samples."""
    # (8 u, 8 v, bh, bw): each of the 64 coefficients a contiguous plane, so each butterfly step is one vector op
    d = (coef.transpose(2, 3, 0, 1).astype(np.int32) * qt.astype(np.int32)[:, :, None, None]).astype(np.int16)
    d = d.astype(np.int32)  # stb stores coefficient x table entry in a short, then computes in int
    v = np.stack(_idct_1d([d[k] for k in range(8)]))  # columns: 1-D over the vertical frequencies
    v += 512
    v >>= 10  # 2 extra bits kept
    out = np.stack(_idct_1d([v[:, k] for k in range(8)]), axis=1)  # rows: 1-D over the horizontal ones
    out += 65536 + (128 << 17)  # rounding and the +128 level shift, then the 17 bits of scale
    out >>= 17
    bh, bw = coef.shape[:2]
    return np.clip(out, 0, 255).astype(np.uint8).transpose(2, 0, 3, 1).reshape(bh * 8, bw * 8)


def _plane(blocks: np.ndarray, qt: np.ndarray, cw: int, ch: int) -> np.ndarray:
    """A component's (ch, cw) samples from its (block rows, block cols, 8, 8) coefficients."""
    return idct_planes(blocks, qt)[:ch, :cw]


def _row_sources(img_h: int, vs: int, comp_h: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output row, the component rows stb passes as in_near and in_far (load_jpeg_image's ystep logic)."""
    near, far = np.empty(img_h, np.int64), np.empty(img_h, np.int64)
    ystep, ypos, line0, line1 = vs >> 1, 0, 0, 0
    for j in range(img_h):
        bottom = ystep >= (vs >> 1)
        near[j], far[j] = (line1, line0) if bottom else (line0, line1)
        ystep += 1
        if ystep >= vs:
            ystep, line0 = 0, line1
            ypos += 1
            if ypos < comp_h:
                line1 += 1
    return near, far


def _resample_h2(a: np.ndarray) -> np.ndarray:
    """stbi__resample_row_h_2 on every row of a (n, w) int32 -> (n, 2w); its last even output weights in[w-2] by 3."""
    n, w = a.shape
    if w == 1:
        return np.repeat(a, 2, axis=1)
    out = np.empty((n, 2 * w), np.int32)
    out[:, 0] = a[:, 0]
    out[:, 1] = (3 * a[:, 0] + a[:, 1] + 2) >> 2
    mid = 3 * a[:, 1:w - 1] + 2
    out[:, 2:2 * w - 2:2] = (mid + a[:, :w - 2]) >> 2
    out[:, 3:2 * w - 2:2] = (mid + a[:, 2:]) >> 2
    out[:, 2 * w - 2] = (3 * a[:, w - 2] + a[:, w - 1] + 2) >> 2
    out[:, 2 * w - 1] = a[:, w - 1]
    return out


def _resample_hv2(t: np.ndarray) -> np.ndarray:
    """stbi__resample_row_hv_2 on rows already filtered vertically (t = 3 near + far, (n, w)) -> (n, 2w)."""
    n, w = t.shape
    if w == 1:
        return np.repeat((t + 2) >> 2, 2, axis=1)
    out = np.empty((n, 2 * w), np.int32)
    out[:, 0] = (t[:, 0] + 2) >> 2
    out[:, 1:2 * w - 1:2] = (3 * t[:, :-1] + t[:, 1:] + 8) >> 4
    out[:, 2:2 * w - 1:2] = (3 * t[:, 1:] + t[:, :-1] + 8) >> 4
    out[:, 2 * w - 1] = (t[:, w - 1] + 2) >> 2
    return out


def upsample(plane: np.ndarray, hs: int, vs: int, img_w: int, img_h: int) -> np.ndarray:
    """A component plane (comp_h, comp_w) uint8 at full size (img_h, img_w) int32, as stb resamples it."""
    near_i, far_i = _row_sources(img_h, vs, plane.shape[0])
    p = plane.astype(np.int32)
    near = p[near_i]
    if hs == 1 and vs == 1:
        out = near
    elif hs == 1 and vs == 2:
        out = (3 * near + p[far_i] + 2) >> 2
    elif hs == 2 and vs == 1:
        out = _resample_h2(near)
    elif hs == 2 and vs == 2:
        out = _resample_hv2(3 * near + p[far_i])
    else:  # stbi__resample_row_generic: nearest neighbour along the row, the near row only
        out = np.repeat(near, hs, axis=1)
    return out[:, :img_w]


def _fixed(x: float) -> int:
    """stbi__float2fixed: (int)(x * 4096.0f + 0.5f) << 8, in float32."""
    return int(np.float32(x) * np.float32(4096.0) + np.float32(0.5)) << 8


_LEVELS = np.arange(256, dtype=np.int32)
_Y_FIXED = (_LEVELS << 20) + (1 << 19)  # y << 20 plus half a level (rounding)
_R_CR = (_LEVELS - 128) * _fixed(1.40200)
_G_CR = (_LEVELS - 128) * -_fixed(0.71414)
_G_CB = ((_LEVELS - 128) * -_fixed(0.34414)) & np.int32(-65536)  # stb keeps only the top 16 bits of this term
_B_CB = (_LEVELS - 128) * _fixed(1.77200)
# red and blue depend on two levels each: their final bytes as (y << 8 | chroma) tables
_R_TABLE = np.clip((_Y_FIXED[:, None] + _R_CR[None, :]) >> 20, 0, 255).astype(np.uint8).reshape(-1)
_B_TABLE = np.clip((_Y_FIXED[:, None] + _B_CB[None, :]) >> 20, 0, 255).astype(np.uint8).reshape(-1)


def ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """stbi__YCbCr_to_RGB_row: 20-bit fixed point, the Cb term of green truncated to 16 bits. Levels 0..255 as int32
    (h, w) -> (h, w, 3) uint8."""
    out = np.empty((*y.shape, 3), np.uint8)
    y8 = y << 8
    out[..., 0] = _R_TABLE[y8 | cr]
    out[..., 2] = _B_TABLE[y8 | cb]
    g = _Y_FIXED[y] + _G_CR[cr] + _G_CB[cb]
    g >>= 20
    out[..., 1] = np.clip(g, 0, 255, out=g)
    return out


def _blinn(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """stbi__blinn_8x8: x * m / 255 rounded, in integers."""
    t = x * m + 128
    return (t + (t >> 8)) >> 8


def read_header(data: bytes, path: str | Path) -> dict:
    """What stb reads from the markers before the first scan: frame type, size, component ids and sampling factors,
    a JFIF APP0 and an Adobe APP14's colour transform."""
    info = {'jfif': False, 'adobe': -1}
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise StbJpegError(f'{path}: corrupt JPEG (no marker at byte {i})')
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xD8 or 0xD0 <= m <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack('>H', data[i + 2:i + 4])
        seg = data[i + 4:i + 2 + length]
        if m == 0xDA:
            break
        if m == 0xE0 and seg[:5] == b'JFIF\0':
            info['jfif'] = True
        elif m == 0xEE and len(seg) >= 12 and seg[:6] == b'Adobe\0':
            info['adobe'] = seg[11]
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            if m not in SOF_STB:
                raise StbJpegError(f'{path}: JPEG frame type SOF{m - 0xC0} (lossless, hierarchical or arithmetic '
                                   'coded): stb_image (Darknet) cannot decode it')
            if seg[0] != 8:
                raise StbJpegError(f'{path}: {seg[0]}-bit JPEG: stb_image (Darknet) decodes 8-bit JPEGs only')
            h, w, n = struct.unpack('>HHB', seg[1:6])
            info.update(progressive=SOF_STB[m], h=h, w=w, ids=[seg[6 + 3 * k] for k in range(n)],
                        hv=[(seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(n)])
        i += 2 + length
    if 'ids' not in info:
        raise StbJpegError(f'{path}: no JPEG frame header (SOF0/1/2) before the first scan')
    return info


def decode(path: str | Path) -> np.ndarray:
    """A JPEG file's pixels exactly as stbi_load(path, ..., 3) returns them: (h, w, 3) uint8 RGB."""
    if jpeglib is None:
        raise ImportError(f'utils.darknet.stb_jpeg needs the jpeglib package: {PIP_INSTALL}')
    path = Path(path)
    info = read_header(path.read_bytes(), path)
    n = len(info['ids'])
    if n not in (1, 3, 4):
        raise StbJpegError(f'{path}: a JPEG with {n} components: stb_image (Darknet) decodes 1, 3 or 4')
    try:
        dct = jpeglib.read_dct(str(path))
        comps = [dct.Y] + ([dct.Cb, dct.Cr] if n >= 3 else []) + ([dct.K] if n == 4 else [])
        qts = [dct.qt[t] for t in dct.quant_tbl_no]
    except Exception as e:  # libjpeg's own message (truncated file, bad Huffman data, ...)
        raise StbJpegError(f'{path}: libjpeg cannot read the coefficients: {e}') from e
    w, h = info['w'], info['h']
    hmax, vmax = max(c[0] for c in info['hv']), max(c[1] for c in info['hv'])
    for c, (hc, vc) in enumerate(info['hv']):
        if hmax % hc or vmax % vc:
            raise StbJpegError(f'{path}: component {c} sampling {hc}x{vc} is not an integer ratio of {hmax}x{vmax}: '
                               'stb_image (Darknet) refuses it')
    planes = []
    for blocks, qt, (hc, vc) in zip(comps, qts, info['hv']):
        cw, ch = (w * hc + hmax - 1) // hmax, (h * vc + vmax - 1) // vmax
        planes.append(upsample(_plane(blocks, qt, cw, ch), hmax // hc, vmax // vc, w, h))
    if n == 1:
        return np.repeat(planes[0][..., None], 3, axis=2).astype(np.uint8)
    is_rgb = n == 3 and (info['ids'] == [82, 71, 66] or (info['adobe'] == 0 and not info['jfif']))
    if is_rgb:
        return np.stack(planes, axis=-1).astype(np.uint8)
    if n == 4 and info['adobe'] == 0:  # CMYK
        return np.stack([_blinn(p, planes[3]) for p in planes[:3]], axis=-1).astype(np.uint8)
    rgb = ycbcr_to_rgb(*planes[:3])  # YCbCr; with 4 components and no Adobe transform stb ignores the fourth
    if n == 4 and info['adobe'] == 2:  # YCCK: the converted colour inverted, times K
        rgb = _blinn(255 - rgb.astype(np.int32), planes[3][..., None]).astype(np.uint8)
    return rgb

"""Render one synthetic image from its parameters, deterministically.

Everything random about an image is fixed in its ``Look`` before rendering, so the same Look gives
the same pixels and the same JPEG bytes in any process. Duplicates of a sample rendered in another
shard are re-rendered from the source's Look.
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .concepts import CHECKER, PLAIN_DARK, PLAIN_LIGHT, STRIPES

_NOISE_TILE = 768
_NOISE_SEED = 0x5EED_C0DE
_noise_tile: np.ndarray | None = None


class Look(NamedTuple):
    """Every parameter of one rendered image."""

    shape: int
    rgb: tuple[int, int, int]
    background: int
    tone_a: tuple[int, int, int]
    tone_b: tuple[int, int, int]
    bg_angle: float  # degrees, stripes and checker
    bg_period: float  # pixels: stripe period or checker cell size
    bg_phase: float  # fraction of a period
    width: int
    height: int
    cx: float  # object centre, fraction of width
    cy: float  # object centre, fraction of height
    size: float  # object diameter, fraction of the shorter side
    rotation: float  # degrees
    noise: float  # standard deviation of the pixel noise, grey levels
    noise_x: float  # where the noise window lies in the shared noise tile, in [0, 1)
    noise_y: float
    light: tuple[float, ...]  # square grid of smooth illumination offsets, grey levels
    quality: int  # JPEG quality


def _tile() -> np.ndarray:
    global _noise_tile
    if _noise_tile is None:
        rng = np.random.default_rng(_NOISE_SEED)
        _noise_tile = rng.standard_normal((_NOISE_TILE, _NOISE_TILE), dtype=np.float32)
    return _noise_tile


def _noise(height: int, width: int, x: float, y: float) -> np.ndarray:
    """A (height, width) window of the shared noise tile; x, y in [0, 1) place it."""
    tile = _tile()
    x = int(x * max(1, _NOISE_TILE - width + 1)) % _NOISE_TILE
    y = int(y * max(1, _NOISE_TILE - height + 1)) % _NOISE_TILE
    if y + height > _NOISE_TILE or x + width > _NOISE_TILE:
        reps_y = -(-(y + height) // _NOISE_TILE)
        reps_x = -(-(x + width) // _NOISE_TILE)
        tile = np.tile(tile, (reps_y, reps_x))
    return tile[y : y + height, x : x + width]


def _background(look: Look) -> Image.Image:
    h, w = look.height, look.width
    if look.background in (PLAIN_LIGHT, PLAIN_DARK):
        return Image.new("RGB", (w, h), tuple(look.tone_a))
    theta = math.radians(look.bg_angle)
    c, s = math.cos(theta), math.sin(theta)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    offset = 4096.0  # keeps coordinates positive so that truncation is floor
    if look.background == STRIPES:
        k = 2.0 / look.bg_period  # two half-periods per period: even = tone a, odd = tone b
        t = (xx * np.float32(c * k) + np.float32(2.0 * look.bg_phase + offset)) + yy * np.float32(s * k)
        index = t.astype(np.int32)
    elif look.background == CHECKER:
        k = 1.0 / look.bg_period
        u = (xx * np.float32(c * k) + np.float32(look.bg_phase + offset)) + yy * np.float32(s * k)
        v = (yy * np.float32(c * k) + np.float32(look.bg_phase + offset)) - xx * np.float32(s * k)
        index = u.astype(np.int32) + v.astype(np.int32)
    else:
        raise ValueError(f"unknown background {look.background}")
    index &= 1
    img = Image.fromarray(index.astype(np.uint8), "P")
    img.putpalette(list(look.tone_a) + list(look.tone_b))
    return img.convert("RGB")


def _polygon(shape: int, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    if shape == 1:  # square
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * 0.9, y * 0.9) for x, y in pts]
    elif shape == 2:  # triangle
        pts = [(math.cos(a), math.sin(a) + 0.18) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == 3:  # star
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.0 if k % 2 == 0 else 0.42
            pts.append((rr * math.cos(a), rr * math.sin(a) + 0.08))
    elif shape == 4:  # hexagon
        pts = [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif shape == 5:  # cross
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        pts = [(x * 0.95, y * 0.95) for x, y in pts]
    elif shape == 6:  # diamond
        pts = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    else:
        raise ValueError(f"shape {shape} is not a polygon")
    theta = math.radians(rotation)
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _interp(n: int, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """For n pixels spread over nodes evenly spaced grid points: left node index and weight of the right."""
    t = np.arange(n, dtype=np.float32) * np.float32((nodes - 1) / max(1, n - 1))
    left = np.minimum(t.astype(np.int64), nodes - 2)
    return left, t - left.astype(np.float32)


def _light_field(h: int, w: int, light: tuple[float, ...]) -> np.ndarray:
    """Smooth (h, w) field interpolating a square grid of values bilinearly over the image.

    Written with elementwise numpy operations only (no BLAS), so it has the same bits on any machine.
    """
    nodes = int(round(math.sqrt(len(light))))
    grid = np.asarray(light, dtype=np.float32).reshape(nodes, nodes)
    ly, fy = _interp(h, nodes)
    lx, fx = _interp(w, nodes)
    fy = fy[:, None]
    rows = grid[ly] * (np.float32(1) - fy) + grid[ly + 1] * fy  # (h, nodes)
    return rows[:, lx] * (np.float32(1) - fx) + rows[:, lx + 1] * fx


def render(look: Look) -> Image.Image:
    """The RGB image described by ``look`` (before JPEG encoding)."""
    h, w = look.height, look.width
    img = _background(look)
    draw = ImageDraw.Draw(img)
    has_light = any(look.light)
    mask = Image.new("L", (w, h), 0) if has_light else None
    cx, cy = look.cx * w, look.cy * h
    r = look.size * min(w, h) / 2
    colour = tuple(int(v) for v in look.rgb)
    targets = [(draw, colour)]
    if mask is not None:
        targets.append((ImageDraw.Draw(mask), 255))
    for canvas, fill in targets:
        if look.shape == 0:  # circle
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif look.shape == 7:  # ring
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(round(r * 0.42))))
        else:
            canvas.polygon(_polygon(look.shape, cx, cy, r, look.rotation), fill=fill)
    offset = None  # illumination of the background plus grey pixel noise everywhere
    if has_light:
        outside = np.asarray(mask) == 0
        offset = _light_field(h, w, look.light) * outside
    if look.noise > 0:
        noise = _noise(h, w, look.noise_x, look.noise_y) * np.float32(look.noise)
        offset = noise if offset is None else offset + noise
    if offset is None:
        return img
    arr = np.asarray(img).astype(np.float32)
    arr += offset[:, :, None]
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def render_jpeg(look: Look) -> bytes:
    return encode_jpeg(render(look), look.quality)

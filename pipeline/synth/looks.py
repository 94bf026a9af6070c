"""Per-concept visual styles and per-sample image parameters.

Each concept gets a base style (object size, rotation, image size, background geometry and tones,
noise level) and a visual *spread* in [0, 1]. A sample's Look is its concept's base style moved by
jitter whose range grows with the spread: a tight concept (spread near 0) repeats nearly the same
picture (object centred, same size, same colour, same background), a varied one (spread near 1)
moves, scales and rotates the object and changes colour and background geometry.

A floor of jitter applies even at spread 0 (a few pixels of position, a few percent of size, a
smooth illumination change and pixel noise) so that two distinct samples of a tight concept are not
perceptual-hash duplicates of each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .concepts import BACKGROUND_TONES, COLOUR_RGB, N_CONCEPTS, concept
from .render import Look

MIN_SIDE = 224
MAX_SIDE = 384
MAX_ASPECT = 1.6

# Jitter floor (at spread 0) and the extra range that the spread adds (at spread 1).
POS_FLOOR, POS_SPREAD = 0.06, 0.5  # centre offset, fraction of the side
SIZE_FLOOR, SIZE_SPREAD = 0.08, 0.4  # log of the size factor
ROT_FLOOR, ROT_SPREAD = 3.0, 35.0  # degrees
DIM_FLOOR, DIM_SPREAD = 0.03, 0.3  # log of each side's factor
LIGHT_FLOOR, LIGHT_SPREAD = 32.0, 10.0  # grey levels of the smooth background illumination field
COLOUR_SPREAD, COLOUR_CHANNEL_SPREAD = 36.0, 14.0  # grey levels
TONE_SPREAD = 26.0
BG_ANGLE_SPREAD, BG_PERIOD_SPREAD = 70.0, 0.5
BG_PHASE_FLOOR = 0.04
NOISE_SPREAD = 6.0


@dataclass(frozen=True)
class ConceptStyle:
    spread: float
    size: float
    rotation: float
    width: int
    height: int
    bg_angle: float
    bg_period: float
    bg_phase: float
    tone_a: tuple[float, float, float]
    tone_b: tuple[float, float, float]
    noise: float


def concept_styles(rng: np.random.Generator) -> list[ConceptStyle]:
    """One base style per concept, in concept id order."""
    n = N_CONCEPTS
    spread = rng.beta(0.6, 0.6, n)
    size = rng.uniform(0.42, 0.62, n)
    rotation = rng.uniform(-12.0, 12.0, n)
    long_side = rng.uniform(280.0, MAX_SIDE, n)
    aspect = rng.uniform(1.0, 1.4, n)
    landscape = rng.random(n) < 0.6
    bg_angle = rng.uniform(0.0, 180.0, n)
    bg_period = rng.uniform(14.0, 40.0, n)
    bg_phase = rng.random(n)
    tone_shift = rng.uniform(-8.0, 8.0, (n, 2, 3))
    noise = rng.uniform(2.0, 4.5, n)
    styles = []
    for i in range(n):
        c = concept(i)
        short = max(MIN_SIDE, long_side[i] / aspect[i])
        w, h = (long_side[i], short) if landscape[i] else (short, long_side[i])
        ta, tb = BACKGROUND_TONES[c.background]
        styles.append(
            ConceptStyle(
                spread=float(spread[i]),
                size=float(size[i]),
                rotation=float(rotation[i]),
                width=int(round(w)),
                height=int(round(h)),
                bg_angle=float(bg_angle[i]),
                bg_period=float(bg_period[i]),
                bg_phase=float(bg_phase[i]),
                tone_a=tuple(float(ta[k] + tone_shift[i, 0, k]) for k in range(3)),
                tone_b=tuple(float(tb[k] + tone_shift[i, 1, k]) for k in range(3)),
                noise=float(noise[i]),
            )
        )
    return styles


def _fit_dims(w: float, h: float) -> tuple[int, int]:
    """Round to pixels within [MIN_SIDE, MAX_SIDE] per side and at most MAX_ASPECT."""
    w = int(round(min(max(w, MIN_SIDE), MAX_SIDE)))
    h = int(round(min(max(h, MIN_SIDE), MAX_SIDE)))
    if w > h:
        w = min(w, int(math.floor(h * MAX_ASPECT)))
    else:
        h = min(h, int(math.floor(w * MAX_ASPECT)))
    return w, h


def _clip_rgb(values) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(v)))) for v in values)


LIGHT_NODES = 6  # the illumination field interpolates a LIGHT_NODES x LIGHT_NODES grid
# Number of uniform draws one Look consumes (kept fixed so that streams stay aligned).
N_DRAWS = 18 + LIGHT_NODES * LIGHT_NODES


def sample_look(cid: int, style: ConceptStyle, u: np.ndarray, dims: tuple[int, int] | None = None) -> Look:
    """A Look for concept ``cid`` from ``N_DRAWS`` uniform draws in [0, 1).

    ``dims`` forces the image size (used for the small-image and extreme-aspect defects).
    """
    s = style.spread
    v = 2.0 * u - 1.0  # symmetric draws in [-1, 1)
    c = concept(cid)
    if dims is None:
        f = DIM_FLOOR + DIM_SPREAD * s
        w, h = _fit_dims(style.width * math.exp(v[0] * f), style.height * math.exp(v[1] * f))
    else:
        w, h = dims
    short = min(w, h)
    size = style.size * math.exp(v[2] * (SIZE_FLOOR + SIZE_SPREAD * s))
    size = min(max(size, 0.22), 0.85)
    # keep the object inside the frame with a small margin
    room_x = max(0.0, 0.5 - size * short / (2 * w) - 0.02)
    room_y = max(0.0, 0.5 - size * short / (2 * h) - 0.02)
    reach = POS_FLOOR + POS_SPREAD * s
    cx = 0.5 + v[3] * min(room_x, reach)
    cy = 0.5 + v[4] * min(room_y, reach)
    rotation = style.rotation + v[5] * (ROT_FLOOR + ROT_SPREAD * s)
    base = COLOUR_RGB[c.colour]
    shift = v[6] * COLOUR_SPREAD * s
    rgb = _clip_rgb(base[k] + shift + v[7 + k] * COLOUR_CHANNEL_SPREAD * s for k in range(3))
    tone_shift = v[10] * TONE_SPREAD * s
    tone_a = _clip_rgb(t + tone_shift for t in style.tone_a)
    tone_b = _clip_rgb(t + tone_shift for t in style.tone_b)
    bg_angle = style.bg_angle + v[11] * BG_ANGLE_SPREAD * s
    bg_period = style.bg_period * math.exp(v[12] * BG_PERIOD_SPREAD * s)
    bg_phase = (style.bg_phase + v[13] * (BG_PHASE_FLOOR + s)) % 1.0
    noise = style.noise + u[14] * NOISE_SPREAD * s
    light_amp = LIGHT_FLOOR + LIGHT_SPREAD * s
    light = tuple((v[18 : 18 + LIGHT_NODES * LIGHT_NODES] * light_amp).tolist())
    return Look(
        shape=c.shape,
        rgb=rgb,
        background=c.background,
        tone_a=tone_a,
        tone_b=tone_b,
        bg_angle=float(round(bg_angle, 4)),
        bg_period=float(round(bg_period, 4)),
        bg_phase=float(round(bg_phase, 5)),
        width=int(w),
        height=int(h),
        cx=float(round(cx, 5)),
        cy=float(round(cy, 5)),
        size=float(round(size, 5)),
        rotation=float(round(rotation, 3)),
        noise=float(round(noise, 3)),
        noise_x=float(round(u[15], 6)),
        noise_y=float(round(u[16], 6)),
        light=light,
        quality=87 + int(u[17] * 7),
    )

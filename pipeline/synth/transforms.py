"""Image-level defects: near-duplicate transforms and JPEG corruption.

Every transform is a pure function of the source bytes and its parameters, so the same parameters
give the same output bytes in any process.
"""

from __future__ import annotations

import io
from typing import NamedTuple

from PIL import Image

from .render import encode_jpeg

NEAR_DUP_MIN_SIDE = 200
MAX_CROP = 0.015  # largest fraction cut from one side by a near-duplicate crop


class NearDup(NamedTuple):
    """How a near duplicate is made from its source's JPEG bytes."""

    op: str  # "reencode", "crop" or "resize"
    quality: int  # quality of the new encoding, never the source's
    crop: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # left, top, right, bottom fractions
    scale: float = 1.0

    def describe(self) -> str:
        if self.op == "crop":
            return "crop " + ",".join(f"{c:.3f}" for c in self.crop) + f" q{self.quality}"
        if self.op == "resize":
            return f"resize {self.scale:.3f} q{self.quality}"
        return f"reencode q{self.quality}"


class Corruption(NamedTuple):
    """How valid JPEG bytes are made undecodable."""

    op: str  # "truncate" (keep a fraction of the bytes) or "header" (overwrite the first bytes)
    keep: float = 1.0
    header_bytes: int = 0

    def describe(self) -> str:
        if self.op == "truncate":
            return f"truncate {self.keep:.3f}"
        return f"header {self.header_bytes}"


def near_duplicate(source: bytes, spec: NearDup) -> bytes:
    img = Image.open(io.BytesIO(source))
    img.load()
    img = img.convert("RGB")
    w, h = img.size
    if spec.op == "crop":
        left, top, right, bottom = spec.crop
        box = (
            int(round(left * w)),
            int(round(top * h)),
            w - int(round(right * w)),
            h - int(round(bottom * h)),
        )
        img = img.crop(box)
    elif spec.op == "resize":
        scale = max(spec.scale, NEAR_DUP_MIN_SIDE / min(w, h))
        size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
        if min(size) < NEAR_DUP_MIN_SIDE:
            size = (max(size[0], NEAR_DUP_MIN_SIDE), max(size[1], NEAR_DUP_MIN_SIDE))
        img = img.resize(size, Image.Resampling.BICUBIC)
    elif spec.op != "reencode":
        raise ValueError(f"unknown near-duplicate op {spec.op!r}")
    out = encode_jpeg(img, spec.quality)
    quality = spec.quality
    while out == source:  # never byte-identical to the source
        quality = quality - 1 if quality > 50 else quality + 7
        out = encode_jpeg(img, quality)
    return out


def corrupt(data: bytes, spec: Corruption) -> bytes:
    if spec.op == "truncate":
        return data[: max(16, int(len(data) * spec.keep))]
    if spec.op == "header":
        n = max(4, spec.header_bytes)
        # a run of bytes that starts no known image format, then the rest of the original stream
        return bytes((0x5A ^ (i * 37)) & 0xFF for i in range(n)) + data[n:]
    raise ValueError(f"unknown corruption op {spec.op!r}")

"""Face detection and face blurring on one image (no Ray here; pipeline.stages.faces runs it).

The detector is OpenCV's frontal-face Haar cascade (Viola-Jones), whose trained cascade file ships
inside the `opencv-python-headless` wheel (`cv2.data.haarcascades`), so nothing is downloaded at
run time. docs/algorithms.md section 9 says why this detector and what it misses.

Boxes are DataComp's `face_bboxes`: one `[x0, y0, x1, y1]` per face, floats normalised to the
image's width and height, in the image's stored pixel grid (EXIF orientation is not applied, as
nowhere else in Curate). Blurring re-encodes only an image with at least one box, and changes
pixels only inside the boxes (JPEG re-encoding aside: see `blur_faces`).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings

import numpy as np

CASCADE = "haarcascade_frontalface_alt.xml"
CASCADE_WINDOW = 24  # the cascade's training window: no smaller face can be found
JPEG_QUALITY = 95


class FaceError(RuntimeError):
    pass


def cascade_path() -> str:
    import cv2

    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(folder, CASCADE) if folder else None
    if path is None or not os.path.exists(path):
        raise FaceError(f"opencv-python-headless {cv2.__version__} ships no {CASCADE} (cv2.data.haarcascades); "
                        "install the version requirements/lock.txt pins (OpenCV 5 wheels dropped the cascade files)")
    return path


class FaceDetector:
    """Frontal faces in a decoded image. One per process: loading the cascade takes ~50 ms.

    OpenCV is held to one thread, so that detection gives the same boxes in the same order on every
    run (its scales are otherwise searched in parallel); Ray runs partitions side by side instead.
    """

    def __init__(self, *, min_face_px: int, min_neighbors: int, scale_factor: float, max_side: int):
        import cv2

        cv2.setNumThreads(1)
        self.cascade = cv2.CascadeClassifier(cascade_path())
        if self.cascade.empty():
            raise FaceError(f"{cascade_path()}: OpenCV could not load the cascade")
        self.min_face_px = min_face_px
        self.min_neighbors = min_neighbors
        self.scale_factor = scale_factor
        self.max_side = max_side

    @classmethod
    def from_config(cls, faces) -> "FaceDetector":
        return cls(min_face_px=faces.min_face_px, min_neighbors=faces.min_neighbors,
                   scale_factor=faces.scale_factor, max_side=faces.max_side)

    def grey(self, image) -> tuple[np.ndarray, float]:
        """The image as 8-bit grey, its longer side at most max_side; with the scale applied."""
        from PIL import Image

        width, height = image.size
        scale = min(1.0, self.max_side / max(width, height))
        grey = image.convert("L")
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            grey = grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(grey, dtype=np.uint8), scale

    def detect(self, image) -> list[list[float]]:
        """Face boxes of a PIL image, normalised [x0, y0, x1, y1], sorted (top to bottom, left to right)."""
        import cv2

        width, height = image.size
        grey, scale = self.grey(image)
        side = max(CASCADE_WINDOW, math.ceil(self.min_face_px * scale))
        if min(grey.shape) < side:
            return []
        found = self.cascade.detectMultiScale(cv2.equalizeHist(grey), scaleFactor=self.scale_factor,
                                              minNeighbors=self.min_neighbors, minSize=(side, side))
        boxes = []
        for x, y, w, h in (tuple(int(v) for v in box) for box in (found if len(found) else [])):
            x0, y0 = x / scale / width, y / scale / height
            x1, y1 = min(1.0, (x + w) / scale / width), min(1.0, (y + h) / scale / height)
            boxes.append([round(x0, 6), round(y0, 6), round(x1, 6), round(y1, 6)])
        return sorted(boxes, key=lambda b: (b[1], b[0], b[3], b[2]))

    def detect_bytes(self, data: bytes) -> list[list[float]]:
        return self.detect(open_image(data, draft_side=self.max_side))


def open_image(data: bytes, draft_side: int | None = None):
    """Decode image bytes (a JPEG at reduced scale when `draft_side` allows: detection runs on at
    most max_side pixels, and libjpeg's DCT scaling keeps at least that)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        if draft_side is not None and image.format == "JPEG" and max(image.size) > 2 * draft_side:
            ratio = draft_side / max(image.size)
            image.draft(None, (math.ceil(image.width * ratio), math.ceil(image.height * ratio)))
        image.load()
    return image


def box_pixels(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised box as the pixel rectangle (left, top, right, bottom) that covers it."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = max(0, math.floor(x0 * width)), max(0, math.floor(y0 * height))
    right, bottom = min(width, math.ceil(x1 * width)), min(height, math.ceil(y1 * height))
    return left, top, max(left, right), max(top, bottom)


def blur_radius(left: int, top: int, right: int, bottom: int) -> float:
    """Gaussian radius for one box: a sixth of its longer side, so that a face of any size is
    blurred past recognition (the detector finds none in a blurred box: tests/test_faces.py)."""
    return max(2.0, max(right - left, bottom - top) / 6)


def blur_faces(data: bytes, boxes) -> tuple[bytes, str]:
    """The image re-encoded with every box Gaussian-blurred; returns (bytes, format).

    Only pixels inside the boxes change. A JPEG stays a JPEG (quality 95, its ICC profile and EXIF
    kept), which re-quantises the whole image: outside the boxes pixels move by a few levels. Every
    other format is written as PNG, losslessly, so outside the boxes they are identical (a palette
    image is written as RGB(A) with the same colours; a 16-bit one loses its low bits).
    """
    from PIL import ImageFilter

    image = open_image(data)
    source_format = image.format
    info = {key: image.info[key] for key in ("icc_profile", "exif") if image.info.get(key)}
    keep_modes = ("RGB", "L") if source_format == "JPEG" else ("RGB", "RGBA", "L", "LA")
    if image.mode not in keep_modes:
        image = image.convert("RGBA" if "A" in image.getbands() and source_format != "JPEG" else "RGB")
    for box in boxes:
        left, top, right, bottom = box_pixels(box, image.width, image.height)
        if right <= left or bottom <= top:
            continue
        region = image.crop((left, top, right, bottom))
        image.paste(region.filter(ImageFilter.GaussianBlur(blur_radius(left, top, right, bottom))), (left, top))
    out = io.BytesIO()
    if source_format == "JPEG":
        image.save(out, "JPEG", quality=JPEG_QUALITY, **info)
        return out.getvalue(), "JPEG"
    image.save(out, "PNG", **({"icc_profile": info["icc_profile"]} if "icc_profile" in info else {}))
    return out.getvalue(), "PNG"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

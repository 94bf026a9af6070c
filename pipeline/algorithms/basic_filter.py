"""DataComp's "basic" filter (docs/algorithms.md section 1) as a vectorised verdict per sample."""

from __future__ import annotations

import numpy as np


def basic_filter_reasons(
    language: np.ndarray,
    caption_words: np.ndarray,
    caption_chars: np.ndarray,
    width: np.ndarray,
    height: np.ndarray,
    *,
    languages: list[str],
    min_caption_words: int,
    min_caption_chars: int,
    min_image_side: int,
    max_aspect_ratio: float,
) -> np.ndarray:
    """Object array: the first failed rule per sample (caption_too_short, not_english,
    image_too_small, extreme_aspect), or None when it passes.

    width/height should already be the original size where the json gives one (DataComp filters on
    the size before img2dataset's resize), else the decoded size.
    """
    n = len(language)
    reasons = np.full(n, None, dtype=object)
    width = np.asarray(width, dtype=np.float64)
    height = np.asarray(height, dtype=np.float64)
    short_side = np.minimum(width, height)
    long_side = np.maximum(width, height)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(short_side > 0, long_side / short_side, np.inf)
    # Length before language: lid.176 on one or two words ("IMG", "cyan") is noise, so a short
    # caption is reported as short, not as foreign.
    rules = [
        ("caption_too_short", (np.asarray(caption_words) < min_caption_words) | (np.asarray(caption_chars) < min_caption_chars)),
        ("not_english", np.array([lang not in languages for lang in language], dtype=bool) if languages else np.zeros(n, bool)),
        ("image_too_small", short_side < min_image_side),
        ("extreme_aspect", aspect > max_aspect_ratio),
    ]
    for name, failed in rules:
        reasons[failed & np.equal(reasons, None)] = name
    return reasons

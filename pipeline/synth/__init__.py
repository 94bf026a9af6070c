"""Synthetic image-text pool with known ground truth, in the img2dataset / DataComp layout.

``synthesize(out_dir, samples, seed)`` renders WebDataset shards of simple pictures (a coloured
shape on a background; 8 shapes x 8 colours x 4 backgrounds = 256 concepts with Zipf-distributed
frequencies and a per-concept visual spread) with templated captions, injects the defects named in
``DEFECTS`` at configurable rates, and writes ``truth/truth.parquet`` describing every sample.
"""

from .concepts import BACKGROUNDS, COLOURS, CONCEPTS, N_CONCEPTS, SHAPES
from .plan import DEFAULT_DEFECT_RATES, DEFECTS, ZIPF_EXPONENT, PoolPlan, SamplePlan, plan_pool
from .pool import IMG2DATASET_SCHEMA, TRUTH_DIR, TRUTH_FILE, TRUTH_SCHEMA, synthesize

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "CONCEPTS",
    "DEFAULT_DEFECT_RATES",
    "DEFECTS",
    "IMG2DATASET_SCHEMA",
    "N_CONCEPTS",
    "PoolPlan",
    "SHAPES",
    "SamplePlan",
    "TRUTH_DIR",
    "TRUTH_FILE",
    "TRUTH_SCHEMA",
    "ZIPF_EXPONENT",
    "plan_pool",
    "synthesize",
]

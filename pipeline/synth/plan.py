"""Plan every sample of a synthetic pool before anything is rendered.

The plan fixes, per sample: concept, image parameters, caption, defect, duplicate source, shard,
key, uid and member layout. Rendering then only turns a plan into bytes, shard by shard, in any
process and in any order. Each aspect draws from its own seeded random stream, so changing one
(say, the defect rates) leaves the others (say, the concepts) as they were.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from . import captions
from .concepts import CONCEPTS, N_CONCEPTS, Concept
from .looks import MIN_SIDE, N_DRAWS, ConceptStyle, concept_styles, sample_look
from .render import Look
from .transforms import MAX_CROP, NEAR_DUP_MIN_SIDE, Corruption, NearDup

DEFECTS: tuple[str, ...] = (
    "mismatched_caption",
    "exact_duplicate",
    "near_duplicate",
    "non_english",
    "short_caption",
    "small_image",
    "extreme_aspect",
    "corrupt_image",
    "missing_caption",
)
DEFAULT_DEFECT_RATES: dict[str, float] = {name: 0.03 for name in DEFECTS}

ZIPF_EXPONENT = 1.1
MAX_SHARD_SIZE = 10_000  # keys carry the index in a shard in 4 digits
URL_HOST = "synthetic.invalid"

# one random stream per aspect of the plan
_STREAM_CONCEPTS = 1
_STREAM_ASSIGN = 2
_STREAM_LOOKS = 3
_STREAM_DEFECTS = 4
_STREAM_SOURCES = 5
_STREAM_CAPTIONS = 6
_STREAM_DEFECT_PARAMS = 7
_STREAM_LAYOUT = 8


@dataclass
class SamplePlan:
    index: int  # position in the whole pool
    shard: int
    position: int  # index within its shard
    key: str
    uid: str
    url: str
    concept_id: int
    caption: str | None
    caption_concept_id: int | None
    language: str | None
    defect: str | None
    draws: np.ndarray  # the uniform draws that fix the image (see looks.sample_look)
    dims: tuple[int, int] | None  # forced image size (small-image and extreme-aspect defects)
    source: int | None = None  # pool index of the sample a duplicate copies
    near: NearDup | None = None
    corruption: Corruption | None = None
    adjacent: bool = True  # False: the sample's tar members are spread apart


def sample_look_of(s: SamplePlan, styles: list[ConceptStyle]) -> Look:
    """The rendering parameters of a sample's own image (for a duplicate: of its source)."""
    return sample_look(s.concept_id, styles[s.concept_id], s.draws, s.dims)


@dataclass
class PoolPlan:
    seed: int
    shard_size: int
    styles: list[ConceptStyle]
    concept_rank: np.ndarray  # rank (1 = most frequent by design) of each concept id
    concept_prob: np.ndarray  # design frequency of each concept id
    samples: list[SamplePlan] = field(default_factory=list)

    @property
    def n_shards(self) -> int:
        return -(-len(self.samples) // self.shard_size)

    def shard_samples(self, shard: int) -> list[SamplePlan]:
        return self.samples[shard * self.shard_size : (shard + 1) * self.shard_size]


def shard_name(shard: int) -> str:
    return f"{shard:08d}"


def sample_key(shard: int, position: int) -> str:
    return f"{shard:05d}{position:04d}"


def sample_uid(seed: int, index: int) -> str:
    return hashlib.blake2b(f"curate-synth:{seed}:{index}".encode(), digest_size=16).hexdigest()


def resolve_rates(defect_rates: dict[str, float] | None) -> dict[str, float]:
    """Defaults overridden by ``defect_rates`` (names not given keep their default rate)."""
    rates = dict(DEFAULT_DEFECT_RATES)
    for name, rate in (defect_rates or {}).items():
        if name not in rates:
            raise ValueError(f"unknown defect {name!r}; known: {', '.join(DEFECTS)}")
        rate = float(rate)
        if not 0.0 <= rate <= 1.0 or math.isnan(rate):
            raise ValueError(f"defect rate for {name} must lie in [0, 1], got {rate}")
        rates[name] = rate
    total = sum(rates.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"defect rates sum to {total:.4f} > 1 (a sample carries at most one defect)")
    return rates


def zipf_probabilities(n: int = N_CONCEPTS, exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return p / p.sum()


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, stream]))


def _mismatched_concept(c: Concept, u: float) -> int:
    """A concept whose shape and colour both differ from ``c``'s (any background)."""
    options = [o.id for o in CONCEPTS if o.shape != c.shape and o.colour != c.colour]
    return options[min(len(options) - 1, int(u * len(options)))]


def _small_dims(u: np.ndarray) -> tuple[int, int]:
    short = int(64 + u[0] * (MIN_SIDE - 24 - 64))  # 64 .. 199
    short = min(short, NEAR_DUP_MIN_SIDE - 1)
    long = int(round(short * (1.0 + u[1] * 1.5)))  # aspect 1 .. 2.5
    return (long, short) if u[2] < 0.5 else (short, long)


def _extreme_dims(u: np.ndarray) -> tuple[int, int]:
    short = int(200 + u[0] * 40)  # 200 .. 239
    long = int(round(short * (3.5 + u[1] * 2.5)))  # aspect 3.5 .. 6
    return (long, short) if u[2] < 0.5 else (short, long)


def plan_pool(
    samples: int,
    seed: int,
    shard_size: int = 1000,
    defect_rates: dict[str, float] | None = None,
    non_adjacent_fraction: float = 0.0,
) -> PoolPlan:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size must lie in 1..{MAX_SHARD_SIZE}, got {shard_size}")
    if not 0.0 <= non_adjacent_fraction <= 1.0:
        raise ValueError(f"non_adjacent_fraction must lie in [0, 1], got {non_adjacent_fraction}")
    if -(-samples // shard_size) > 100_000:
        raise ValueError("more than 100000 shards: raise shard_size")
    rates = resolve_rates(defect_rates)
    n = samples

    rng = _rng(seed, _STREAM_CONCEPTS)
    styles = concept_styles(rng)
    by_rank = rng.permutation(N_CONCEPTS)  # by_rank[r] = concept id of rank r + 1
    probs_by_rank = zipf_probabilities()
    concept_rank = np.empty(N_CONCEPTS, dtype=np.int64)
    concept_rank[by_rank] = np.arange(1, N_CONCEPTS + 1)
    concept_prob = probs_by_rank[concept_rank - 1]

    u_assign = _rng(seed, _STREAM_ASSIGN).random(n)
    ranks = np.minimum(np.searchsorted(np.cumsum(probs_by_rank), u_assign, side="right"), N_CONCEPTS - 1)
    drawn_concepts = by_rank[ranks]

    u_looks = _rng(seed, _STREAM_LOOKS).random((n, N_DRAWS))

    cuts = np.cumsum([rates[d] for d in DEFECTS])
    u_defect = _rng(seed, _STREAM_DEFECTS).random(n)
    defect_idx = np.searchsorted(cuts, u_defect, side="right")  # len(DEFECTS) = clean

    u_source = _rng(seed, _STREAM_SOURCES).random(n)
    u_caption = _rng(seed, _STREAM_CAPTIONS).random((n, 6))
    u_params = _rng(seed, _STREAM_DEFECT_PARAMS).random((n, 8))
    u_layout = _rng(seed, _STREAM_LAYOUT).random(n)

    plan = PoolPlan(seed=seed, shard_size=shard_size, styles=styles, concept_rank=concept_rank, concept_prob=concept_prob)
    clean: list[int] = []  # pool indices of clean samples so far (duplicate sources)
    n_templates = len(captions.EN_TEMPLATES)
    for i in range(n):
        shard, position = divmod(i, shard_size)
        defect = DEFECTS[defect_idx[i]] if defect_idx[i] < len(DEFECTS) else None
        cid = int(drawn_concepts[i])
        source = None
        if defect in ("exact_duplicate", "near_duplicate"):
            if clean:
                source = clean[min(len(clean) - 1, int(u_source[i] * len(clean)))]
                cid = plan.samples[source].concept_id
            else:
                defect = None  # nothing to copy yet
        c = CONCEPTS[cid]
        uc, up = u_caption[i], u_params[i]

        dims = None
        if defect == "small_image":
            dims = _small_dims(up)
        elif defect == "extreme_aspect":
            dims = _extreme_dims(up)
        if source is not None:  # a duplicate is drawn exactly like its source
            draws, dims = plan.samples[source].draws, plan.samples[source].dims
        else:
            draws = u_looks[i]

        english = captions.english_caption(
            c, int(uc[0] * n_templates), int(uc[1] * 6), int(uc[2] * 6), int(uc[3] * 6)
        )
        caption, caption_cid, language = english, cid, "en"
        if defect == "mismatched_caption":
            caption_cid = _mismatched_concept(c, uc[4])
            other = CONCEPTS[caption_cid]
            caption = captions.english_caption(
                other, int(uc[0] * n_templates), int(uc[1] * 6), int(uc[2] * 6), int(uc[3] * 6)
            )
        elif defect == "non_english":
            language = captions.FOREIGN_LANGUAGES[int(uc[4] * len(captions.FOREIGN_LANGUAGES))]
            caption = captions.foreign_caption(c, language, int(uc[5] * 4))
        elif defect == "short_caption":
            caption = captions.short_caption(c, int(uc[4] * 6))
        elif defect == "missing_caption":
            caption, caption_cid, language = None, None, None

        near = None
        if defect == "near_duplicate":
            op_u = up[0]
            if op_u < 0.4:
                near = NearDup("reencode", quality=55 + int(up[1] * 26))
            elif op_u < 0.7:
                crop = tuple(float(round(0.003 + x * (MAX_CROP - 0.003), 4)) for x in up[2:6])
                near = NearDup("crop", quality=80 + int(up[1] * 16), crop=crop)
            else:
                scale = 0.75 + up[2] * 0.18 if up[3] < 0.5 else 1.07 + up[2] * 0.23
                near = NearDup("resize", quality=80 + int(up[1] * 16), scale=float(round(scale, 4)))
        corruption = None
        if defect == "corrupt_image":
            if up[0] < 0.7:
                corruption = Corruption("truncate", keep=float(round(0.3 + up[1] * 0.4, 4)))
            else:
                corruption = Corruption("header", header_bytes=8 + int(up[1] * 57))

        uid = sample_uid(seed, i)
        plan.samples.append(
            SamplePlan(
                index=i,
                shard=shard,
                position=position,
                key=sample_key(shard, position),
                uid=uid,
                url=f"https://img{int(uid[:2], 16) % 8}.{URL_HOST}/{uid[2:4]}/{uid}.jpg",
                concept_id=cid,
                caption=caption,
                caption_concept_id=caption_cid,
                language=language,
                defect=defect,
                draws=draws,
                dims=dims,
                source=source,
                near=near,
                corruption=corruption,
                adjacent=not (u_layout[i] < non_adjacent_fraction),
            )
        )
        if defect is None:
            clean.append(i)

    # a shard with a single sample cannot spread that sample's members apart
    for shard in range(plan.n_shards):
        members = plan.shard_samples(shard)
        if len(members) < 2:
            for s in members:
                s.adjacent = True
    return plan

"""A held-out evaluation set for the synthetic pools: clean, class-balanced, never part of a pool.

``synthesize_eval_set(out_dir, per_class, seed)`` renders every one of the 256 concepts the same
way a pool does (the concept styles of ``seed``, the same renderer), with no defect, and writes it
in the two formats ``curate eval`` reads for any data, synthetic or real:

- ``classes/``: an image folder, one folder per class, plus ``classes.json`` mapping each folder
  to its class name. ``per_class`` images of each concept. The class name is the concept in the
  words of the English captions (``red circle on a striped background``), the folder its safe
  form (``red_circle_on_a_striped_background``).
- ``pairs/``: WebDataset shards of image-caption pairs (``{key}.jpg``, ``{key}.txt``,
  ``{key}.json``) plus ``sizes.json``: ``pairs_per_class`` pictures of each concept, each with an
  English caption drawn from the pool's templates and synonyms.

Its images come from random streams no pool uses, and its uids from another namespace, so no
image of the set is ever a sample of a training pool, whatever the seeds. With the seed of the
training pool the set shows the pool's own concept styles (an in-distribution held-out set); with
another seed each concept keeps its shape, colour and background kind but gets other base
styles (object size, rotation, background geometry and tones), a shifted held-out set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

from pipeline.io.tar import TarWriter

from . import captions
from .concepts import CONCEPTS, Concept
from .looks import N_DRAWS, ConceptStyle, concept_styles, sample_look
from .plan import _STREAM_CONCEPTS, _rng
from .pool import _process_context, _write_atomic
from .render import render_jpeg

CLASSES_DIR = "classes"
CLASSES_FILE = "classes.json"
PAIRS_DIR = "pairs"
# random streams of the evaluation set (a pool uses streams 1-8)
_STREAM_CLASS_LOOKS = 101
_STREAM_PAIR_LOOKS = 102
_STREAM_PAIR_CAPTIONS = 103
BACKGROUND_WORDS = {name: words[0] for name, words in captions.EN_BACKGROUNDS.items()}


def class_name(c: Concept) -> str:
    """The concept as the captions word it: colour, shape, background adjective."""
    return f"{c.colour_name} {c.shape_name} on a {BACKGROUND_WORDS[c.background_name]} background"


def safe_name(name: str) -> str:
    """A folder name for a class name: lower case, runs of other characters than a-z0-9 as one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def eval_uid(seed: int, kind: str, index: int) -> str:
    return hashlib.blake2b(f"curate-synth-eval:{seed}:{kind}:{index}".encode(), digest_size=16).hexdigest()


class _ConceptTask(NamedTuple):
    concept_id: int
    style: ConceptStyle
    class_draws: list  # per_class rows of N_DRAWS uniforms
    pair_draws: list


def _render_concept(task: _ConceptTask) -> tuple[list[bytes], list[bytes]]:
    def images(draws):
        return [render_jpeg(sample_look(task.concept_id, task.style, row)) for row in draws]

    return images(task.class_draws), images(task.pair_draws)


def _clear(folder: str, marker: str) -> None:
    """Remove an earlier evaluation set's folder (recognised by its marker file) before rewriting it."""
    if not os.path.exists(folder):
        return
    if not os.path.isfile(os.path.join(folder, marker)):
        raise FileExistsError(f"{folder} exists and is not an evaluation set's (no {marker}): choose another --out")
    shutil.rmtree(folder)


def synthesize_eval_set(out_dir: str, per_class: int = 10, seed: int = 1, *, pairs_per_class: int = 1,
                        shard_size: int = 1000, workers: int | None = None) -> dict:
    """Render the evaluation set into the local directory ``out_dir`` (layout: module docstring).

    The same arguments (``workers`` aside) give byte-identical files. Returns a summary."""
    if per_class < 1 or pairs_per_class < 0:
        raise ValueError("per_class must be >= 1 and pairs_per_class >= 0")
    started = time.perf_counter()
    styles = concept_styles(_rng(seed, _STREAM_CONCEPTS))  # the concept styles a pool of this seed has
    n = len(CONCEPTS)
    class_draws = _rng(seed, _STREAM_CLASS_LOOKS).random((n, per_class, N_DRAWS))
    pair_draws = _rng(seed, _STREAM_PAIR_LOOKS).random((n, pairs_per_class, N_DRAWS))
    pair_choices = _rng(seed, _STREAM_PAIR_CAPTIONS).random((n, pairs_per_class, 4))
    tasks = [_ConceptTask(c.id, styles[c.id], class_draws[c.id], pair_draws[c.id]) for c in CONCEPTS]

    workers = max(1, min(int(workers or os.cpu_count() or 1), n))
    if workers == 1:
        rendered = list(map(_render_concept, tasks))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_process_context()) as pool:
            rendered = list(pool.map(_render_concept, tasks, chunksize=8))

    classes_dir = os.path.join(out_dir, CLASSES_DIR)
    pairs_dir = os.path.join(out_dir, PAIRS_DIR)
    _clear(classes_dir, CLASSES_FILE)
    _clear(pairs_dir, "sizes.json")
    folders = {}
    for c, (class_images, _) in zip(CONCEPTS, rendered):
        name = class_name(c)
        folder = safe_name(name)
        folders[folder] = name
        os.makedirs(os.path.join(classes_dir, folder), exist_ok=True)
        for i, data in enumerate(class_images):
            _write_atomic(os.path.join(classes_dir, folder, f"{i:05d}.jpg"), data)
    _write_atomic(os.path.join(classes_dir, CLASSES_FILE), (json.dumps(folders, indent=1) + "\n").encode())

    os.makedirs(pairs_dir, exist_ok=True)
    pairs = [(c, j, data) for c, (_, pair_images) in zip(CONCEPTS, rendered) for j, data in enumerate(pair_images)]
    templates = len(captions.EN_TEMPLATES)
    sizes = {}
    for shard, start in enumerate(range(0, len(pairs), shard_size)):
        name = f"{shard:08d}.tar"
        path = os.path.join(pairs_dir, name)
        with open(f"{path}.tmp{os.getpid()}", "wb") as handle, TarWriter(handle) as tar:
            for index, (c, j, data) in enumerate(pairs[start : start + shard_size], start):
                u = pair_choices[c.id, j]
                caption = captions.english_caption(c, int(u[0] * templates), int(u[1] * 6), int(u[2] * 6),
                                                   int(u[3] * 6))
                key = f"{index:08d}"
                meta = {"uid": eval_uid(seed, "pair", index), "caption": caption, "class": class_name(c),
                        "concept": c.name}
                tar.add(f"{key}.jpg", data)
                tar.add(f"{key}.txt", caption.encode("utf-8"))
                tar.add(f"{key}.json", json.dumps(meta, indent=1).encode("utf-8"))
        os.replace(f"{path}.tmp{os.getpid()}", path)
        sizes[name] = min(shard_size, len(pairs) - start)
    _write_atomic(os.path.join(pairs_dir, "sizes.json"), (json.dumps(sizes, indent=1) + "\n").encode())
    return {
        "out_dir": out_dir,
        "classes": len(folders),
        "images": len(folders) * per_class,
        "pairs": len(pairs),
        "seed": seed,
        "classes_dir": classes_dir,
        "pairs_dir": pairs_dir,
        "seconds": round(time.perf_counter() - started, 3),
    }

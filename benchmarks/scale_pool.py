"""The synthetic pool of benchmarks/scale.py: many small JPEGs in WebDataset shards, with
DataComp-style metadata (scores and embeddings) beside them, written fast on every core.

Every sample is a pure function of (seed, index), so shards are written in parallel and a copy
can name its source anywhere in the pool:

- an **original**: an 8x8 grid of random colours upscaled (bicubic) to 24-48 px a side, JPEG
  quality 90; its image embedding one of `CONCEPTS` concept centres plus noise (cosine ~0.72 to
  the centre, ~0.52 between members of one concept), L2-normalised;
- an **exact copy** (`EXACT`): an earlier original's JPEG bytes, its own caption and uid;
- a **near copy** (`NEAR`): an earlier original decoded, 3 grey levels brighter, re-encoded at
  quality 75 (pHash 0-2 bits away), image embedding at cosine ~0.995 to the source's;
- a **semantic copy** (`SEMANTIC`): a new image whose embedding lies at cosine ~0.99 to an earlier
  original's (what semantic dedup alone catches).

Captions are 2-12 words (the 2-word ones fail the basic filter's 3-word minimum). The text
embedding is the image embedding plus noise of a per-sample strength, so the clip score (their
cosine, stored as both clip_*_similarity_score columns) spreads over ~0.1-0.8 (median ~0.46).

Layout under the pool folder: shards/NNNNNNNN.tar ({key}.jpg, {key}.txt, {key}.json with a 32-hex
`uid`), metadata/NNNNNNNN.parquet + .npz (l14_img, l14_txt, float16, row-aligned), and pool.json,
written last: a folder without it, or with other parameters, is written again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

VERSION = 1
CONCEPTS = 200
EXACT, NEAR, SEMANTIC = 0.01, 0.01, 0.01  # fractions of the pool
WORDS = ("red blue green small large photo of a the on with dog cat car tree house river mountain city street "
         "person people two three old new wooden metal bright dark sunny rainy table chair window garden "
         "boat beach road bird flower sky night morning picture view close up white black").split()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _role(seed: int, index: int) -> str:
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big") / 2**64
    if index == 0 or u >= EXACT + NEAR + SEMANTIC:
        return "original"
    return "exact" if u < EXACT else "near" if u < EXACT + NEAR else "semantic"


class Sampler:
    def __init__(self, seed: int, dim: int):
        self.seed, self.dim = seed, dim
        self.centres = _unit(np.random.default_rng((seed, 2**32)).normal(size=(CONCEPTS, dim)))

    def original(self, index: int) -> tuple[bytes, np.ndarray, np.random.Generator]:
        """(JPEG bytes, image embedding) of `index` as an original, and the generator that made them."""
        from PIL import Image

        rng = np.random.default_rng((self.seed, index))
        grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        width, height = (int(v) for v in rng.integers(24, 49, 2))
        image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        centre = self.centres[rng.integers(CONCEPTS)]
        return buffer.getvalue(), _unit(centre + rng.normal(0, 0.12, self.dim)), rng

    def source(self, index: int, rng: np.random.Generator) -> int:
        """An earlier original for the copy at `index`."""
        while True:
            j = int(rng.integers(0, index))
            if _role(self.seed, j) == "original":
                return j

    def sample(self, index: int) -> tuple[bytes, str, np.ndarray, np.ndarray]:
        """(JPEG bytes, caption, image embedding, text embedding) of sample `index`."""
        from PIL import Image

        role = _role(self.seed, index)
        jpeg, image, rng = self.original(index)
        if role != "original":
            source_jpeg, source_image, _ = self.original(self.source(index, rng))
            if role == "exact":
                jpeg, image = source_jpeg, source_image
            elif role == "near":
                pixels = np.asarray(Image.open(io.BytesIO(source_jpeg)).convert("RGB"), np.int16) + 3
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=75)
                jpeg, image = buffer.getvalue(), _unit(source_image + rng.normal(0, 0.012, self.dim))
            else:  # its own image
                image = _unit(source_image + rng.normal(0, 0.018, self.dim))
        caption = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(2, 13))))
        text = _unit(image + rng.normal(0, rng.uniform(0.1, 0.4), self.dim))
        return jpeg, caption, image, text


def write_shard(job: tuple) -> dict:
    """One tar shard and its metadata pair; returns the counts by role."""
    import pyarrow as pa

    from pipeline.io.datacomp import write_metadata
    from pipeline.io.tar import TarWriter

    folder, shard, start, count, seed, dim = job
    sampler = Sampler(seed, dim)
    name = f"{shard:08d}"
    uids, captions, images, texts, roles = [], [], [], [], {}
    tmp = folder / "shards" / f".{name}.tar.tmp"
    with open(tmp, "wb") as handle, TarWriter(handle) as tar:
        for index in range(start, start + count):
            jpeg, caption, image, text = sampler.sample(index)
            uid = hashlib.blake2b(f"uid:{seed}:{index}".encode(), digest_size=16).hexdigest()
            key = f"{index:010d}"
            tar.add(f"{key}.jpg", jpeg)
            tar.add(f"{key}.txt", caption.encode())
            tar.add(f"{key}.json", json.dumps({"uid": uid, "url": f"https://example.invalid/{index}.jpg"}).encode())
            uids.append(uid)
            captions.append(caption)
            images.append(image)
            texts.append(text)
            role = _role(seed, index)
            roles[role] = roles.get(role, 0) + 1
    image16, text16 = np.asarray(images, np.float16), np.asarray(texts, np.float16)
    score = (image16.astype(np.float64) * text16.astype(np.float64)).sum(axis=1)
    table = pa.table({"uid": uids, "text": captions, "clip_b32_similarity_score": score,
                      "clip_l14_similarity_score": score})
    write_metadata(str(folder / "metadata" / f"{name}.parquet"), table, {"l14_img": image16, "l14_txt": text16})
    os.replace(tmp, folder / "shards" / f"{name}.tar")
    return roles


def ensure_pool(folder: Path, samples: int, *, shard_size: int = 10_000, dim: int = 64, seed: int = 0,
                processes: int | None = None) -> tuple[dict, float | None]:
    """The pool's pool.json, written first when missing or made with other parameters; and the
    seconds writing it took (None when it was already there)."""
    params = {"version": VERSION, "samples": samples, "shard_size": shard_size, "dim": dim, "seed": seed}
    stamp = folder / "pool.json"
    if stamp.exists():
        made = json.loads(stamp.read_text())
        if made["params"] == params:
            return made, None
    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "shards").mkdir(parents=True)
    (folder / "metadata").mkdir()
    jobs = [(folder, shard, start, min(shard_size, samples - start), seed, dim)
            for shard, start in enumerate(range(0, samples, shard_size))]
    roles: dict[str, int] = {}
    with Pool(processes or os.cpu_count()) as pool:
        for counts in pool.imap_unordered(write_shard, jobs):
            for role, n in counts.items():
                roles[role] = roles.get(role, 0) + n
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    made = {"params": params, "shards": len(jobs), "roles": dict(sorted(roles.items())), "bytes": size}
    stamp.write_text(json.dumps(made, indent=1) + "\n")
    return made, time.perf_counter() - started

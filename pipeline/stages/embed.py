"""Stage 2, embed: open_clip image and text embeddings, CLIP score and (optionally) DFN score.

Two steps per work item, a fixed run of `embed.batch_size` embeddable rows of one partition:

1. `prepare_chunk` (CPU worker): fetch the images by the byte ranges ingest recorded, decode (JPEGs
   much larger than the model input at reduced scale), apply open_clip's own inference transform up
   to its ToTensor step, and ship the result as uint8 [n, H, W, 3]; tokenize the captions.
2. `EmbedWorker` (actor holding the models): ToTensor + Normalize on the model's device (the same
   arithmetic as open_clip's transform, so results equal `model.encode_image(preprocess(img))`),
   batched forward of both towers, L2-normalise, cosine.

The driver assembles each partition's results, in ingest row order, into
`OUTPUT/embeddings/part-N.parquet` (uid, image_embedding, text_embedding, clip_score, dfn_score) as
soon as its last work item is back, and records the partition done (resume). Rows ingest dropped
as unusable are not embedded; rows without a usable caption get an image embedding only. With
`embed.provided` the stage runs no model: pipeline.stages.embed_provided takes them from the pool's
DataComp metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.algorithms.reduce import truncate
from pipeline.config import UserError
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.io.shards import fetch_members
from pipeline.reasons import NO_TEXT, NOT_EMBEDDED

if TYPE_CHECKING:
    from pipeline import models

log = logging.getLogger("curate")

NAME = "embed"
INGEST_COLUMNS = ["uid", "drop_reason", "caption", "image_offset", "image_size"]
# Fields that change how fast, not what: left out of the resume fingerprint.
_PERFORMANCE_FIELDS = {"actors", "cpus_per_actor", "decode_workers", "decode_cpus", "prefetch"}


class EmbedError(RuntimeError):
    pass


def config_fingerprint(config) -> dict:
    from pipeline import models  # open_clip and torch: imported where a model is needed, not by the provided path

    # store_dims null (whole embeddings) is left out, so runs from before the option resume
    unchanged = _PERFORMANCE_FIELDS | ({"store_dims"} if config.embed.store_dims is None else set())
    payload = {
        "embed": config.embed.model_dump(mode="json", exclude=unchanged),
        "dfn": config.dfn.model_dump(mode="json"),
    }
    from pipeline.stages import faces_provided

    if faces_provided(config):
        payload["face_bboxes"] = True  # embed.provided also copies the metadata's face_bboxes
    try:
        specs = models.config_specs(config)
    except models.ModelSpecError:
        specs = {}
    payload["weights"] = {section: models.weights_identity(spec) for section, spec in specs.items()}
    return payload


def outputs(paths) -> list[str]:
    return [paths.embeddings_dir, paths.stage_dir(NAME)]  # the stage dir: embed.provided's join


# --- resources -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    device: str  # cpu | cuda
    actors: int
    actor_cpus: float  # what an actor reserves in Ray
    actor_gpus: float
    threads: int  # torch threads per actor
    decode_slots: int
    decode_cpus: float


def plan_resources(embed, cpus: float, gpus: float) -> Resources:
    """Place the actors and decode workers on a cluster of `cpus` CPUs and `gpus` GPUs.

    On CPU an actor runs torch on `threads` threads but reserves less than that in Ray, so that
    decode workers always get a slot beside it (on 2 CPUs: actor 1.5 with 2 threads, decode 0.5).
    """
    if cpus < 1e-6 and gpus < 1e-6:
        return _unplaced(embed)
    if embed.device == "cuda" and gpus < 1e-6:
        raise EmbedError("embed.device is cuda but the Ray cluster has no GPUs")
    if embed.device != "cpu" and gpus > 1e-6:
        actors = embed.actors or max(1, int(gpus))
        actor_cpus = embed.cpus_per_actor or 1.0
        decode_cpus = embed.decode_cpus or 1.0
        slots = embed.decode_workers or max(1, int((cpus - actors * actor_cpus) // decode_cpus))
        return Resources("cuda", actors, actor_cpus, min(1.0, gpus / actors), max(1, math.ceil(actor_cpus)), slots, decode_cpus)
    actors = embed.actors or 1
    share = max(cpus / actors, 1e-3)
    decode_cpus = embed.decode_cpus or 0.5
    slots = embed.decode_workers or max(1, int(cpus // 8))
    threads = math.ceil(embed.cpus_per_actor) if embed.cpus_per_actor else max(1, int(share))
    reserved = embed.cpus_per_actor or max(0.1, (cpus - slots * decode_cpus) / actors)
    return Resources("cpu", actors, min(reserved, share), 0.0, threads, slots, decode_cpus)


def _unplaced(embed) -> Resources:
    """A cluster with no workers yet (an autoscaling cluster starts empty) cannot size the pools:
    ask for what the config names (one actor, one GPU each with embed.device cuda, one CPU each
    otherwise) so that the autoscaler sees the demand and adds nodes."""
    actor_cpus = embed.cpus_per_actor or 1.0
    threads = max(1, math.ceil(actor_cpus))
    if embed.device == "cuda":
        return Resources("cuda", embed.actors or 1, actor_cpus, 1.0, threads, embed.decode_workers or 1,
                         embed.decode_cpus or 1.0)
    if embed.device == "auto":
        log.warning("embed: the Ray cluster has no workers yet, so embed.device auto plans CPU actors; "
                    "set embed.device: cuda to ask the autoscaler for GPU workers")
    return Resources("cpu", embed.actors or 1, actor_cpus, 0.0, threads, embed.decode_workers or 1,
                     embed.decode_cpus or 0.5)


def cpu_actor_env() -> dict[str, str]:
    """OpenMP threads that sleep instead of spinning while they wait. A CPU actor shares its cores
    with decode workers; spinning threads then fight the decoder for the cores, and the forward
    ran at 18 img/s instead of 30 beside a busy decoder (ViT-S-32-alt, 2 threads, 2 cores; 47 alone)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# --- step 1: decode + preprocess (CPU worker) ---------------------------------------------------


class ImagePrep:
    """open_clip's inference transform for one model, split where the PIL work ends.

    `__call__` runs the PIL steps (resize, crop, convert to RGB) and returns uint8 [H, W, 3];
    `mean` / `std` are the Normalize that follows ToTensor. Should a transform not end in
    ToTensor + Normalize, the whole transform runs here and the result is float32 [3, H, W].
    """

    def __init__(self, preprocess_cfg: dict):
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from torchvision.transforms import Normalize, ToTensor

        self.cfg = preprocess_cfg
        transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        steps = list(transform.transforms)
        split = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), len(steps))
        tail = steps[split:]
        if len(tail) == 2 and isinstance(tail[1], Normalize):
            self.pil_steps, self.full = steps[:split], None
            self.mean, self.std = [float(v) for v in tail[1].mean], [float(v) for v in tail[1].std]
        else:
            self.pil_steps, self.full, self.mean, self.std = [], transform, None, None
        size = preprocess_cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)

    def draft_size(self, width: int, height: int, factor: float) -> tuple[int, int]:
        """The smallest decode size that leaves `factor` times the resize target (PIL draft picks
        the largest DCT scale whose result is at least this large)."""
        th, tw = self.size
        mode = self.cfg.get("resize_mode", "shortest")
        if mode == "squash":
            return math.ceil(tw * factor), math.ceil(th * factor)
        ratio = max(width / tw, height / th) if mode == "longest" else min(width / tw, height / th)
        return math.ceil(width * factor / ratio), math.ceil(height * factor / ratio)

    def __call__(self, image) -> np.ndarray:
        if self.full is not None:
            return self.full(image).numpy()
        for step in self.pil_steps:
            image = step(image)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3 or array.shape[:2] != self.size:
            raise EmbedError(f"preprocessing gave an image of shape {array.shape}, expected {self.size + (3,)}")
        return array


def decode_image(data: bytes, preps: list[ImagePrep], draft_factor: float | None) -> list[np.ndarray]:
    """Decode once (reduced scale where every model allows it), preprocess for each model."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        if draft_factor is not None and image.format == "JPEG":
            sizes = [prep.draft_size(image.width, image.height, draft_factor) for prep in preps]
            image.draft(None, (max(s[0] for s in sizes), max(s[1] for s in sizes)))
        image.load()
        return [prep(image) for prep in preps]


@lru_cache(maxsize=4)
def _tools(spec_json: str):
    """Per process: the image preps and tokenizers the worker's models need (built once)."""
    from pipeline import models

    spec = json.loads(spec_json)
    preps = {key: ImagePrep(cfg) for key, cfg in spec["preprocess"].items()}
    tokenizers = {key: models.get_tokenizer(name) for key, name in spec["tokenizers"].items()}
    return preps, tokenizers


def prepare_chunk(item: dict, spec: dict) -> dict:
    """Step 1 for one work item: images as uint8 per preprocessing, captions as tokens per tokenizer."""
    preps, tokenizers = _tools(json.dumps(spec, sort_keys=True))
    keys = list(preps)
    samples = [{"uid": u, "image_offset": o, "image_size": s} for u, o, s in zip(item["uids"], item["offsets"], item["sizes"])]
    fetched = fetch_members(item["source"], samples, kinds=("image",), block_size=item.get("block_size", 8 * 2**20))
    images: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for sample, members in zip(samples, fetched):
        try:
            arrays = decode_image(members["image"], [preps[k] for k in keys], spec["draft_factor"])
        except Exception as exc:
            raise EmbedError(
                f"shard {item['source']}: sample {sample['uid']}: the image ingest decoded does not decode now "
                f"(the shard changed since ingest?): {type(exc).__name__}: {exc}"
            ) from exc
        for key, array in zip(keys, arrays):
            images[key].append(array)
    text_pos = [i for i, caption in enumerate(item["captions"]) if caption is not None]
    tokens = {}
    for key, tokenizer in tokenizers.items():
        ids = tokenizer([item["captions"][i] for i in text_pos]) if text_pos else None
        tokens[key] = None if ids is None else ids.numpy().astype(np.int32)
    return {
        "partition": item["partition"],
        "chunk": item["chunk"],
        "rows": np.asarray(item["rows"], dtype=np.int32),
        "text_pos": np.asarray(text_pos, dtype=np.int32),
        "images": {key: np.stack(arrays) for key, arrays in images.items()},
        "tokens": tokens,
    }


# --- step 2: forward (actor) ---------------------------------------------------------------------


def _trim_supported(model) -> bool:
    """Whether the text tower's pooled output depends only on tokens up to the pooled one (causal
    attention, pooling at the EOT / EOS / first token): then padding after the longest caption of a
    batch can be cut without changing any result."""
    import open_clip

    if isinstance(model, open_clip.CLIP):
        return getattr(model, "attn_mask", None) is not None and model.text_pool_type in ("argmax", "eos", "first")
    text = getattr(model, "text", None)
    if isinstance(model, open_clip.CustomTextCLIP) and isinstance(text, open_clip.transformer.TextTransformer):
        return text.attn_mask is not None and text.cls_emb is None and text.pool_type in ("argmax", "eos", "first")
    return False


def _pool_positions(model, tokens):
    import torch

    pool = model.text_pool_type if hasattr(model, "text_pool_type") else model.text.pool_type
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        eos = getattr(model, "text_eos_id", None) if hasattr(model, "text_pool_type") else getattr(model.text, "eos_id", None)
        return (tokens == eos).int().argmax(dim=-1)
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


def encode_text(model, tokens, trim: bool):
    """model.encode_text, on tokens cut after the batch's last pooled position (rounded up to 8)."""
    import open_clip
    import torch

    if not trim:
        return model.encode_text(tokens)
    length = min(tokens.shape[1], int(_pool_positions(model, tokens).max()) + 1)
    length = min(tokens.shape[1], -(-length // 8) * 8)
    tokens = tokens[:, :length]
    if not isinstance(model, open_clip.CLIP):
        return model.encode_text(tokens)  # TextTransformer slices its own positions and mask
    # open_clip's CLIP.encode_text with the positional embedding and causal mask cut to `length`
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def _verify_trim(loaded: models.LoadedModel) -> bool:
    """Check once, on the CPU in fp32, that the cut text forward equals open_clip's own."""
    import torch

    if not _trim_supported(loaded.model):
        return False
    tokens = loaded.tokenizer(["a photo of a cat", "two dogs playing in the snow near a red barn at dusk"])
    with torch.inference_mode():
        full = loaded.model.encode_text(tokens)
        cut = encode_text(loaded.model, tokens, True)
    same = torch.allclose(full, cut, rtol=1e-4, atol=1e-5)
    if not same:
        log.warning("embed: the cut text forward differs from open_clip's; running the full context instead")
    return same


class EmbedWorker:
    """Holds the models (each distinct model once) on the actor's device; one call per work item."""

    def __init__(self, specs: dict, device: str, precision: str, threads: int, draft_factor: float | None):
        import torch

        from pipeline import models

        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.precision = _precision(precision, self.device.type)
        self.draft_factor = draft_factor
        self.roles = {role: models.ModelSpec(**spec) for role, spec in specs.items()}
        self.models: dict[str, models.LoadedModel] = {}
        self.trim: dict[str, bool] = {}
        for key, spec in models.unique_specs(self.roles).items():
            loaded = models.load_model(spec)
            self.trim[key] = _verify_trim(loaded)
            loaded.model.to(self.device)
            self.models[key] = loaded
        self.preps = {key: ImagePrep(m.preprocess_cfg) for key, m in self.models.items()}
        self._norm = {}
        log.info("embed actor: %s on %s (%s, %d threads)", models.describe(self.roles.values()), self.device,
                 self.precision, torch.get_num_threads())

    def prepare_spec(self) -> dict:
        """What the decode workers need: each model's preprocessing and tokenizer, deduplicated."""
        preprocess, tokenizers = {}, {}
        for key, loaded in self.models.items():
            preprocess[self._prep_key(key)] = loaded.preprocess_cfg
            tokenizers[self._token_key(key)] = loaded.spec.model
        return {"preprocess": preprocess, "tokenizers": tokenizers, "draft_factor": self.draft_factor}

    def _prep_key(self, key: str) -> str:
        return json.dumps(self.models[key].preprocess_cfg, sort_keys=True, default=list)

    def _token_key(self, key: str) -> str:
        tokenizer = self.models[key].tokenizer
        return f"{type(tokenizer).__name__}|{getattr(tokenizer, 'context_length', '')}|{self.models[key].spec.model}"

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _to_device(self, array: np.ndarray):
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arrays from Ray's object store are read-only; never written
            tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _images(self, key: str, array: np.ndarray):
        """uint8 [n, H, W, 3] -> normalised float [n, 3, H, W], the arithmetic of ToTensor + Normalize."""
        import torch

        x = self._to_device(array)
        prep = self.preps[key]
        if prep.full is not None:
            return x.float()
        if key not in self._norm:
            mean = torch.as_tensor(prep.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            std = torch.as_tensor(prep.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self._norm[key] = mean, std
        mean, std = self._norm[key]
        x = x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        return x.sub_(mean).div_(std)

    def embed(self, key: str, images: np.ndarray, tokens: np.ndarray | None):
        """L2-normalised fp32 image and text embeddings of one model (text None without captions)."""
        import torch
        import torch.nn.functional as F

        model = self.models[key].model
        with torch.inference_mode():
            pixels = self._images(key, images)
            with self._autocast():
                image = model.encode_image(pixels)
            image = F.normalize(image.float(), dim=-1)
            text = None
            if tokens is not None and len(tokens):
                ids = self._to_device(tokens).to(torch.long)
                with self._autocast():
                    text = encode_text(model, ids, self.trim[key])
                text = F.normalize(text.float(), dim=-1)
        return image, text

    def _forward(self, prepared: dict) -> dict:
        import torch

        text_pos = self._to_device(prepared["text_pos"]).to(torch.long)
        out: dict = {}
        scores: dict[str, np.ndarray | None] = {}
        for key in self.models:
            image, text = self.embed(key, prepared["images"][self._prep_key(key)], prepared["tokens"][self._token_key(key)])
            score = None if text is None else (image.index_select(0, text_pos) * text).sum(dim=-1)
            scores[key] = None if score is None else score.cpu().numpy().astype(np.float32)
            if key == self.roles["embed"].key:
                out["image_embedding"] = image.to(torch.float16).cpu().numpy()
                out["text_embedding"] = None if text is None else text.to(torch.float16).cpu().numpy()
        out["clip_score"] = scores[self.roles["embed"].key]
        out["dfn_score"] = scores[self.roles["dfn"].key] if "dfn" in self.roles else None
        return out

    def __call__(self, prepared: dict, progress=None) -> dict:
        """One work item's results; `progress`, when given, is told the samples embedded."""
        started = time.perf_counter()
        try:
            out = self._forward(prepared)
        except Exception as exc:
            if self.device.type != "cuda" or "out of memory" not in str(exc).lower() or len(prepared["rows"]) < 2:
                raise
            out = self._forward_halves(prepared)
        out.update(partition=prepared["partition"], chunk=prepared["chunk"], rows=prepared["rows"],
                   text_pos=prepared["text_pos"], seconds=time.perf_counter() - started)
        if progress is not None:
            progress(samples=len(prepared["rows"]))
        return out

    def _forward_halves(self, prepared: dict) -> dict:
        """A batch too large for the GPU's free memory: run it as two halves and join them."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        n = len(prepared["rows"])
        half = n // 2
        parts = []
        for lo, hi in ((0, half), (half, n)):
            text_pos = prepared["text_pos"]
            in_half = (text_pos >= lo) & (text_pos < hi)
            first_text = int(np.searchsorted(text_pos, lo))
            part = {
                "partition": prepared["partition"], "chunk": prepared["chunk"], "rows": prepared["rows"][lo:hi],
                "text_pos": text_pos[in_half] - lo,
                "images": {k: v[lo:hi] for k, v in prepared["images"].items()},
                "tokens": {k: None if v is None else v[first_text:first_text + int(in_half.sum())] for k, v in prepared["tokens"].items()},
            }
            parts.append(self(part))

        def join(name):
            values = [p[name] for p in parts if p[name] is not None]
            return np.concatenate(values) if values else None

        return {name: join(name) for name in ("image_embedding", "text_embedding", "clip_score", "dfn_score")}


# --- driver: work items and assembly -------------------------------------------------------------


def embeddable(drop_reasons: list) -> tuple[np.ndarray, np.ndarray]:
    """(rows to embed, whether each of them has a usable caption), in row order."""
    rows, has_text = [], []
    for i, reason in enumerate(drop_reasons):
        if reason in NOT_EMBEDDED:
            continue
        rows.append(i)
        has_text.append(reason not in NO_TEXT)
    return np.asarray(rows, dtype=np.int64), np.asarray(has_text, dtype=bool)


def chunk_items(table: pa.Table, partition: int, source: str, batch_size: int) -> list[dict]:
    """Fixed work items: runs of `batch_size` embeddable rows, the same on every run."""
    columns = table.select(INGEST_COLUMNS).to_pydict()
    rows, has_text = embeddable(columns["drop_reason"])
    items = []
    for chunk, start in enumerate(range(0, len(rows), batch_size)):
        picked = rows[start : start + batch_size]
        texts = has_text[start : start + batch_size]
        items.append({
            "partition": partition,
            "chunk": chunk,
            "source": source,
            "rows": picked.tolist(),
            "uids": [columns["uid"][r] for r in picked],
            "offsets": [columns["image_offset"][r] for r in picked],
            "sizes": [columns["image_size"][r] for r in picked],
            "captions": [columns["caption"][r] if ok else None for r, ok in zip(picked, texts)],
        })
    for item in items:
        if any(o is None for o in item["offsets"]):
            raise EmbedError(f"shard {source}: an embeddable row has no recorded image range (ingest output damaged?)")
    return items


def _vectors(values: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    flat = pa.array(values.reshape(-1), type=pa.float16())
    vector = pa.list_(pa.field("element", pa.float16()), dim)
    return pa.FixedSizeListArray.from_arrays(flat, type=vector, mask=pa.array(~valid))


def embeddings_schema(dim: int) -> pa.Schema:
    vector = pa.list_(pa.field("element", pa.float16()), dim)  # Parquet's name for list items
    return pa.schema([
        pa.field("uid", pa.string()),
        pa.field("image_embedding", vector),
        pa.field("text_embedding", vector),
        pa.field("clip_score", pa.float32()),
        pa.field("dfn_score", pa.float32()),
    ])


def stored_dims(dim: int, store_dims: int | None) -> int:
    """The width the embeddings are stored with: embed.store_dims, at most the model's `dim`."""
    if store_dims is None:
        return dim
    if store_dims > dim:
        raise UserError(f"embed.store_dims={store_dims} exceeds the embedder's {dim}-d embeddings")
    return store_dims


def _stored(vectors: np.ndarray, width: int) -> np.ndarray:
    """Embeddings as stored: the first `width` dimensions, renormalised (Matryoshka truncation)."""
    return vectors if width == vectors.shape[1] else truncate(vectors, width).astype(np.float16)


def assemble(uids: pa.ChunkedArray | pa.Array, results: list[dict], dim: int, width: int | None = None) -> pa.Table:
    """One partition's embeddings table: every ingest row in order, nulls where not embedded. The
    results are `dim` wide (their scores come from the whole embeddings); the table keeps `width`
    dimensions of them (embed.store_dims; None: all)."""
    n = len(uids)
    width = dim if width is None else width
    image = np.zeros((n, width), np.float16)
    text = np.zeros((n, width), np.float16)
    has_image, has_text, has_dfn = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    clip, dfn = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for result in results:
        rows = np.asarray(result["rows"], dtype=np.int64)
        if result["image_embedding"].shape[1] != dim:
            raise EmbedError(f"the model gives {result['image_embedding'].shape[1]}-d embeddings, expected {dim}")
        image[rows], has_image[rows] = _stored(result["image_embedding"], width), True
        if result["text_embedding"] is not None:
            text_rows = rows[np.asarray(result["text_pos"], dtype=np.int64)]
            text[text_rows], has_text[text_rows] = _stored(result["text_embedding"], width), True
            clip[text_rows] = result["clip_score"]
            if result["dfn_score"] is not None:
                dfn[text_rows], has_dfn[text_rows] = result["dfn_score"], True
    return pa.Table.from_arrays(
        [
            uids if isinstance(uids, pa.ChunkedArray) else pa.chunked_array([uids]),
            _vectors(image, has_image, width),
            _vectors(text, has_text, width),
            pa.array(clip, mask=~has_text),
            pa.array(dfn, mask=~has_dfn),
        ],
        schema=embeddings_schema(width),
    )


def embeddable_total(ctx) -> int:
    """The samples the partitions still to do will embed: from ingest's counts in the manifest, or,
    where it has none (the stage run on its own), from ingest's output."""
    record = ctx.manifest.stage("ingest")
    ingested = record.counts.get("partitions", {}) if record is not None else {}
    total = 0
    for partition in ctx.todo([p.index for p in ctx.partitions]):
        stats = ingested.get(str(partition))
        if stats is None:
            reasons = read_table(ctx.read("ingest", partition), ["drop_reason"]).column("drop_reason")
            total += len(embeddable(reasons.to_pylist())[0])
        else:
            total += stats["samples"] - sum(n for reason, n in stats["reasons"].items() if reason in NOT_EMBEDDED)
    return total


def record_totals(ctx, models_used: dict, device: str, dim: int, width: int | None = None) -> None:
    """The stage's totals over every partition, this run's and those done before a resume."""
    stats = ctx.record.counts.get("partitions", {}).values()
    ctx.record.samples_in = sum(s["samples"] for s in stats)
    ctx.record.samples_out = sum(s["embedded"] for s in stats)
    ctx.record.counts.update(
        embedded=ctx.record.samples_out,
        not_embedded=ctx.record.samples_in - ctx.record.samples_out,
        image_only=sum(s["embedded"] - s["with_text"] for s in stats),
        models=models_used,
        device=device,
        dim=dim,
    )
    if width is not None and width != dim:
        ctx.record.counts["stored_dims"] = width


@dataclass
class _Partition:
    uids: pa.ChunkedArray
    expected: int
    results: list

    @property
    def complete(self) -> bool:
        return len(self.results) == self.expected


def run(ctx) -> None:
    if ctx.config.embed.provided is not None:
        from pipeline.stages import embed_provided

        embed_provided.run(ctx)
        return
    from pipeline import models
    from pipeline.ray_adapter import cluster_cpus, cluster_gpus, map_prepared

    cfg = ctx.config.embed
    specs = models.config_specs(ctx.config)
    dim = models.embed_dim(specs["embed"])
    width = stored_dims(dim, cfg.store_dims)
    res = plan_resources(cfg, cluster_cpus(), cluster_gpus())
    log.info("embed: %s; %d %s actor(s) x %.2g CPUs (%d threads), %d decode slots x %.2g CPUs",
             models.describe(models.unique_specs(specs).values()), res.actors, res.device, res.actor_cpus,
             res.threads, res.decode_slots, res.decode_cpus)
    open_parts: dict[int, _Partition] = {}

    def finish(partition: int, part: _Partition) -> None:
        table = assemble(part.uids, part.results, dim, width)
        write_table_atomic(table, ctx.paths.stage_part(NAME, partition))
        embedded = sum(len(r["rows"]) for r in part.results)
        with_text = sum(len(r["text_pos"]) for r in part.results)
        ctx.partition_done(partition, {"samples": len(part.uids), "embedded": embedded, "with_text": with_text})

    def items():
        for partition in ctx.todo([p.index for p in ctx.partitions]):
            table = read_table(ctx.read("ingest", partition), INGEST_COLUMNS)
            chunks = chunk_items(table, partition, ctx.partitions[partition].url, cfg.batch_size)
            part = _Partition(table.column("uid"), len(chunks), [])
            if part.complete:
                finish(partition, part)
                continue
            open_parts[partition] = part
            for item in chunks:
                item["block_size"] = ctx.config.write.read_block_bytes
                yield item

    worker_kwargs = {
        "specs": {role: vars(spec) for role, spec in specs.items()},
        "device": res.device,
        "precision": cfg.precision,
        "threads": res.threads,
        "draft_factor": cfg.jpeg_draft_factor,
    }
    progress = ctx.progress(embeddable_total(ctx))
    results = map_prepared(
        prepare_chunk, EmbedWorker, items(), worker_kwargs=worker_kwargs, actors=res.actors,
        actor_cpus=res.actor_cpus, actor_gpus=res.actor_gpus, prepare_cpus=res.decode_cpus,
        prepare_slots=res.decode_slots, prefetch=cfg.prefetch, actor_concurrency=2 if res.device == "cuda" else 1,
        actor_env=cpu_actor_env() if res.device == "cpu" else None, progress=progress, timeout_s=ctx.item_timeout_s,
    )
    for result in results:
        part = open_parts[result["partition"]]
        part.results.append(result)
        if part.complete:
            finish(result["partition"], open_parts.pop(result["partition"]))
    if open_parts:
        raise EmbedError(f"partitions {sorted(open_parts)} did not get all their work items back")
    record_totals(ctx, {role: spec.label for role, spec in specs.items()}, res.device, dim, width)

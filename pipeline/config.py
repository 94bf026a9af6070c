"""The one typed job configuration: YAML file + dotted-key overrides, validated by pydantic.

Every section forbids unknown keys, so a typo fails the run at start with the key's dotted name
instead of being silently ignored for hours. UserError, the base of ConfigError, is what every check
of a user's request raises (the command line prints it as one line).
"""

from __future__ import annotations

import difflib
import json
import os
import posixpath
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """Something the user asked for that cannot be done (config, input, credentials, weights).

    `curate` prints it as one line and exits 2, without a traceback: its message is one line that
    names the file, key or URL to fix.
    """


def one_line(text: str) -> str:
    """The first paragraph of an error message with its lines joined: DuckDB and Ray put context (the SQL
    with a caret under it, a remote traceback) after a blank line."""
    paragraph = text.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines() if line.strip())


class ConfigError(UserError, ValueError):
    """A job config that cannot be run; the message names the offending key and where it was set."""


# How to give a filesystem its credentials, by URL scheme.
_CREDENTIALS_HELP = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; AWS_ENDPOINT_URL for an "
          "S3-compatible server)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file (or run `gcloud auth "
          "application-default login`)",
    "az": "set AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY)",
}
_SCHEME_FAMILY = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}
# Packages whose exceptions mean the storage behind a URL failed (fsspec's s3, gcs and azure backends).
_STORAGE_PACKAGES = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "aiohttp"}


def storage_error(key: str, url: str | list[str], exc: BaseException) -> UserError | None:
    """`exc`, raised while reading `url` (the value of `key`), as a UserError that names both and says how
    to get access; None when `exc` is not a storage failure."""
    if not (isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_PACKAGES):
        return None
    urls = [url] if isinstance(url, str) else list(url)
    shown = ", ".join(urls)
    detail = one_line(f"{type(exc).__name__}: {exc}")
    name = type(exc).__name__.lower()
    if isinstance(exc, PermissionError) or "credential" in name or "authentication" in name:
        scheme = urls[0].split("://", 1)[0] if "://" in urls[0] else "file"
        if scheme == "file":
            return UserError(f"{key} {shown}: no access ({detail}); check the path's permissions")
        how = _CREDENTIALS_HELP.get(_SCHEME_FAMILY.get(scheme, scheme), f"give fsspec the credentials of {scheme}://")
        return UserError(f"{key} {shown}: no access ({detail}); {how}, or point {key} at local files")
    return UserError(f"{key} {shown}: cannot be read ({detail})")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray address. null: RAY_ADDRESS, else a cluster started on this machine, else an "
        "embedded local Ray. 'local': always embedded. Anything else: that cluster.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded Ray (default: all).")
    rows_per_bucket: int = Field(
        250_000, ge=1,
        description="Keyed records per shuffle bucket in dedup's and select's global steps: bounds what one task "
        "holds (a task needs about 1 KB a record while it decides; pHash dedup makes one record per sample and index "
        "table). Results do "
        "not depend on it.",
    )
    shuffle_map_mib: int = Field(
        64, ge=1,
        description="Input a shuffle's map task gathers before it partitions it (Ray Data's shuffle_input_batch_bytes, "
        "1 GiB by default there): the task needs about three times this. Results do not depend on it.",
    )
    item_timeout_s: float | None = Field(
        3600.0, gt=0,
        description="Wall-clock bound in seconds (default 3600) of one work item: a partition's call in any stage, an "
        "embed batch's preparation or model call, counted from when it is handed to its worker (a fresh worker's "
        "start included). One that runs longer is killed with its worker process and retried once in a fresh one; "
        "a second time fails the run naming its shard. null: no bound. The steps that run over the whole pool "
        "at once (the shuffles of dedup, select and embed.provided, semantic dedup's groups, k-means training, "
        "sampling for it) are not bounded.",
    )


# The face cascade's window (pipeline.faces.CASCADE_WINDOW): no image smaller is searched.
CASCADE_MIN_SIDE = 24

# The image members WebDataset readers (open_clip's trainer among them) take, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class IngestConfig(Section):
    max_image_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Images whose header declares more pixels are dropped as image_too_large without "
        "being decoded (decompression bombs). Pillow refuses more than twice its own default "
        "(178,956,970) regardless.",
    )
    max_member_bytes: int = Field(
        64 * 2**20, ge=1, description="Tar members larger than this are not read (oversize_member)."
    )
    image_extensions: list[str] = Field(
        list(IMAGE_EXTENSIONS),
        min_length=1,
        description="Member extensions taken as the sample's image, in order of preference.",
    )


class BasicFilterConfig(Section):
    """DataComp's "basic" filter (docs/algorithms.md section 1); defaults are DataComp's."""

    enabled: bool = True
    languages: list[str] = Field(["en"], description="Allowed fastText lid.176 top-1 languages; [] allows all.")
    min_caption_words: int = Field(3, ge=0, description="Keep when len(caption.split()) >= this (DataComp: > 2).")
    min_caption_chars: int = Field(6, ge=0, description="Keep when len(caption) >= this (DataComp: > 5).")
    min_image_side: int = Field(200, ge=0, description="Keep when min(original width, height) >= this.")
    max_aspect_ratio: float = Field(3.0, gt=0, description="Keep when max/min side <= this.")


class ProvidedConfig(Section):
    """Scores and embeddings that come with the pool (DataComp metadata), used instead of a model pass.

    DataComp ships per metadata file NAME.parquet (uid, url, text, ..., clip_b32_similarity_score,
    clip_l14_similarity_score, sha256) and NAME.npz beside it (b32_img, b32_txt, l14_img, l14_txt),
    row-aligned. Samples are matched by uid; every embeddable sample must have a row.
    """

    metadata: str | list[str] = Field(
        ..., description="The metadata .parquet files: a directory, glob, brace pattern or list (any fsspec URL); "
        "each with its .npz beside it."
    )
    embeddings: Literal["b32", "l14"] = Field(
        "l14", description="Which .npz pair (b32_img/b32_txt or l14_img/l14_txt) drives clustering, dedup and DBP."
    )
    clip_score: str = Field("clip_l14_similarity_score", description="Metadata column taken as clip_score.")
    dfn_score: str | None = Field(
        None, description="Metadata column taken as dfn_score (e.g. DFN scores joined into the metadata); null: none."
    )


class EmbedConfig(Section):
    """The embedder: its image embeddings drive clustering and dedup; its cosine is clip_score."""

    model: str | None = Field(
        None,
        description="open_clip architecture (ViT-B-32), 'hf-hub:org/repo' or 'local-dir:/path'; null turns "
        "embedding off.",
    )
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag (laion2b_s34b_b79k) or a checkpoint path or URL (.safetensors, "
        ".bin, or an open_clip training checkpoint .pt); null with an architecture: random weights (seeded); "
        "null with hf-hub:/local-dir:.",
    )
    batch_size: int = Field(
        256,
        ge=1,
        description="Images per forward pass and per work item. Work items are fixed runs of a partition's "
        "embeddable rows, so results do not depend on scheduling.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the cluster has GPUs.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPU (fp16 where bf16 is unsupported), fp32 on CPU."
    )
    actors: int | None = Field(
        None, ge=1, description="Model actors. null: one per GPU when embedding on GPU, one on CPU."
    )
    cpus_per_actor: float | None = Field(
        None,
        gt=0,
        description="CPUs a model actor takes (on CPU also its torch threads, rounded up). null: 1 for a GPU "
        "actor; on CPU the cluster's CPUs shared among the actors, less what the decode workers reserve.",
    )
    decode_workers: int | None = Field(
        None,
        ge=1,
        description="Decode + preprocess workers (CPU actors). null: on GPU the CPUs left beside the actors; "
        "on CPU one per 8 CPUs (at least 1).",
    )
    decode_cpus: float | None = Field(
        None, gt=0, description="CPUs Ray reserves per decode worker. null: 1 on GPU, 0.5 on CPU."
    )
    prefetch: int = Field(2, ge=1, description="Decoded batches queued per actor ahead of its forward pass.")
    jpeg_draft_factor: float | None = Field(
        2.0,
        ge=1.0,
        description="JPEGs at least this many times larger than the model input are decoded at reduced "
        "scale (libjpeg DCT scaling, PIL draft) to no less than this multiple of it, then preprocessed as "
        "open_clip does. 2.0 is Pillow's own reducing gap. null: always decode at full size (embeddings "
        "identical to open_clip's preprocessing of the full image).",
    )
    provided: ProvidedConfig | None = Field(
        None, description="Take embeddings and scores from DataComp-style metadata instead of running a model "
        "(set instead of model)."
    )
    store_dims: int | None = Field(
        None, ge=1,
        description="Store only the first this many dimensions of the image and text embeddings (OUTPUT/embeddings, "
        "and the shards' with write.embeddings), renormalised: Matryoshka storage. clip_score and dfn_score are "
        "computed from the full embeddings first. null: store them whole. cluster.dims and select.dbp.dims can "
        "ask for at most this many.",
    )

    @property
    def enabled(self) -> bool:
        """The stage produces embeddings, from a model or from the pool's metadata."""
        return self.model is not None or self.provided is not None

    @model_validator(mode="after")
    def _one_source(self):
        if self.model is not None and self.provided is not None:
            raise ValueError("embed.model and embed.provided: set one source of embeddings, not both")
        return self


class DfnConfig(Section):
    """Optional second model whose image-text cosine is dfn_score (a data-filtering network).

    It runs inside the embed stage, on the same decoded images; naming the embedder's model and weights
    again loads it once (dfn_score = clip_score).
    """

    model: str | None = Field(
        None, description="open_clip architecture (ViT-H-14-quickgelu), 'hf-hub:' id or 'local-dir:'; null: no DFN score."
    )
    pretrained: str | None = Field(
        None, description="pretrained tag (dfn5b, dfn2b) or checkpoint path or URL; null as for embed.pretrained."
    )


class ReducedDims(Section):
    """The embedding space a clustering works in (docs/algorithms.md section 3.1): the dedup clustering's
    (cluster.*) is also the space SemDeDup compares in; DBP's (select.dbp.*) is its own."""

    dims: int | None = Field(
        None, ge=1,
        description="Dimensions to cluster in: the image embedding reduced to this many (by `reduce`) and "
        "renormalised. null: the full stored embedding (as does its full width with truncate). At most the "
        "model's embedding dimension and embed.store_dims.",
    )
    reduce: Literal["truncate", "pca"] = Field(
        "truncate",
        description="How to reduce to `dims`: truncate keeps the first dims coordinates (Matryoshka truncation); "
        "pca projects onto the dims principal components of the k-means training sample, saved beside the "
        "centroids (NAME.pca.npy) and applied the same way at assignment and in later top-ups. Default "
        "truncate (with dims null: no reduction).",
    )

    @model_validator(mode="after")
    def _pca_has_dims(self):
        if self.reduce == "pca" and self.dims is None:
            raise ValueError("reduce pca needs dims, the number of principal components to keep")
        return self


class ClusterConfig(ReducedDims):
    """Spherical k-means of image embeddings into fine clusters, inside which SemDeDup compares."""

    k: int | None = Field(None, ge=1, description="Clusters; null: one per `samples_per_cluster` samples to cluster (those that survived ingest with an embedding), capped at the training sample's size.")
    samples_per_cluster: int = Field(1000, ge=1, description="Average cluster size when k is null (SemDeDup authors: ~N/k = 9000).")
    niter: int = Field(20, ge=1, description="k-means iterations (SemDeDup authors: 100).")
    seed: int = 0
    max_train_points: int = Field(1_000_000, ge=1, description="k-means trains on a seeded sample of at most this many embeddings.")
    centroids: str | None = Field(
        None, description="URL of saved centroids (.npy, e.g. OUTPUT/clusters/dedup_centroids.npy of another run) to assign to instead of training."
    )


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop samples whose image bytes (sha256) equal a kept sample's.")
    phash: bool = Field(True, description="Drop near duplicates: 64-bit pHash within phash_radius bits.")
    phash_radius: int = Field(4, ge=0, le=32, description="Hamming radius; components are linked transitively, the smallest uid kept.")
    semantic: bool = Field(False, description="SemDeDup on image embeddings inside each cluster (needs embed.model).")
    semantic_eps: float = Field(0.05, gt=0, lt=1, description="Drop b when max cos to an earlier member of its cluster > 1 - eps.")
    block_size: int = Field(4096, ge=1, description="Rows per similarity block: memory is block_size x cluster size.")


class ScoreFilterConfig(Section):
    """Keep score >= threshold, or the top fraction of the whole pool (ties by uid); null: off."""

    # One mode at a time: a command-line override of one replaces the other given by the job file.
    MODES: ClassVar[tuple[str, ...]] = ("threshold", "fraction")

    threshold: float | None = Field(
        None, ge=-1, le=1,
        description="Keep samples scoring >= this. Set on the command line, it replaces a fraction given by the "
        "job file (unless fraction is overridden too).",
    )
    fraction: float | None = Field(
        None, gt=0, le=1,
        description="Keep this top fraction of the pool. Set on the command line, it replaces a threshold given "
        "by the job file (unless threshold is overridden too).",
    )

    @model_validator(mode="after")
    def _one_mode(self):
        if self.threshold is not None and self.fraction is not None:
            raise ValueError("set threshold or fraction, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.threshold is not None or self.fraction is not None


class DbpConfig(ReducedDims):
    """Density-based pruning by concept-cluster complexity (docs/algorithms.md section 6)."""

    enabled: bool = False
    target: int | float = Field(
        0.5, gt=0, description="Samples to keep: a count (integer) or a fraction of those entering DBP (float <= 1)."
    )
    k: int = Field(100, ge=1, description="Concept clusters (capped at the sample count). Paper: 100 (DataComp medium) to 500.")
    temperature: float = Field(0.5, gt=0, description="Softmax temperature over cluster complexity.")
    n_neighbors: int = Field(20, ge=1, description="Nearest other centroids averaged for d_inter.")
    balance_ratio: float | None = Field(None, gt=0, le=1, description="Per-cluster lower bound floor(target / k * r); null: 1.")
    niter: int = Field(20, ge=1)
    seed: int = 0
    max_train_points: int = Field(1_000_000, ge=1)

    @field_validator("target")
    @classmethod
    def _fraction_at_most_one(cls, value):
        if isinstance(value, float) and value > 1:
            raise ValueError("a fractional target must be <= 1; give a count as an integer")
        return value


class FacesConfig(Section):
    """Face detection (docs/algorithms.md section 9): OpenCV's frontal-face Haar cascade, whose file
    ships inside opencv-python-headless. Every image that can be embedded gets face_count and
    face_bboxes; select.faces and write.blur_faces decide what is done with them."""

    enabled: bool = Field(False, description="Detect faces in every image that can be embedded (the faces stage).")
    source: Literal["detect", "provided"] = Field(
        "detect",
        description="detect: run the detector. provided: take the face_bboxes column of embed.provided's DataComp "
        "metadata (DataComp ships one for every sample) and run no detector.",
    )
    min_face_px: int = Field(
        24, ge=1,
        description="Smallest face side, in the image's own pixels, that is reported. The cascade's window is 24 "
        "pixels of the image it searches (at most max_side), so smaller faces are never found.",
    )
    min_neighbors: int = Field(
        4, ge=1,
        description="The cascade's score: a face is reported where at least this many overlapping windows found it. "
        "Higher: fewer false faces, more missed ones.",
    )
    scale_factor: float = Field(1.1, gt=1, le=2, description="Step between the scales the cascade searches.")
    max_side: int = Field(
        1024, ge=CASCADE_MIN_SIDE,
        description="Images whose longer side exceeds this are searched at reduced scale (longer side = this); "
        "boxes are normalised, so they do not depend on it.",
    )


class SelectConfig(Section):
    subset: str | None = Field(
        None, description="A DataComp subset file (.npy of dtype u8,u8 uid halves): keep only these uids (not_in_subset), before the score filters."
    )
    clip: ScoreFilterConfig = ScoreFilterConfig()
    dfn: ScoreFilterConfig = ScoreFilterConfig()
    dbp: DbpConfig = DbpConfig()
    where: str | None = Field(
        None, description="DuckDB SQL predicate over the samples' metadata columns; samples for which it is not true are dropped (sql_filter)."
    )
    faces: Literal["keep", "drop"] = Field(
        "keep", description="drop: drop every sample in whose image a face was found (has_faces, PASS-style; needs "
        "faces.enabled). keep: faces decide nothing here (write.blur_faces may blur them)."
    )


class WriteConfig(Section):
    shard_size: int = Field(10_000, ge=1, description="Target samples per output shard (shards are balanced).")
    embeddings: bool = Field(
        False,
        description="Also write each sample's embedder image and text embeddings into the shards "
        "({uid}.image_embedding.npy, {uid}.text_embedding.npy, float16) for distillation (needs embed.model).",
    )
    subset_file: bool = Field(True, description="Write the kept uids as a DataComp subset file (OUTPUT/datacomp_subset.npy).")
    read_block_bytes: int = Field(
        8 * 2**20, ge=2**16, description="Read-ahead block for range reads of source shards."
    )
    blur_faces: bool = Field(
        False,
        description="Publish images with a face re-encoded, each face box Gaussian-blurred (DataComp-style; needs "
        "faces.enabled). Their new sha256 is in the metadata (blurred_sha256) and in the shard's json; every other "
        "image is published byte-identical.",
    )


# `reference: latest:ROOT` names the runs root whose latest successful run is the reference (pipeline.io.reference).
LATEST_PREFIX = "latest:"


class CurateConfig(Section):
    input: str | list[str] = Field(
        ...,
        description="The pool: a directory of .tar shards, a glob, a brace pattern "
        "(pool/{00000000..00000099}.tar), or a list of these; any fsspec URL.",
    )
    output: str = Field(..., description="The run's output URL (local path, s3://, gs://, ...).")
    output_lease_s: float = Field(
        120.0, ge=5,
        description="A run holds a lease on its output (OUTPUT/lease.json: run id, host, pid), renewed every quarter "
        "of this many seconds; a second run into the same output refuses to start while the lease is fresh, and takes "
        "over, with a warning, a lease not renewed for this long or whose process on the same host is gone.",
    )
    reference: str | None = Field(
        None,
        description="An earlier run's output to top up (a scheduled incremental run): only shards it (and the runs "
        "it referenced) never saw are processed, new samples are deduplicated against everything those runs kept, "
        "and DBP adds to their clusters with their centroids. 'latest:ROOT' (latest:s3://BUCKET/runs): at start, "
        "the latest successful run directly under ROOT (its manifest.json has final counts; of the runs no other "
        "run there builds on, the last to finish, ties by URL), never this run's own output; the manifest records "
        "the run chosen. No successful run under ROOT yet: the whole input is processed (the first day).",
    )
    ray: RayConfig = RayConfig()
    ingest: IngestConfig = IngestConfig()
    basic_filter: BasicFilterConfig = BasicFilterConfig()
    embed: EmbedConfig = EmbedConfig()
    dfn: DfnConfig = DfnConfig()
    cluster: ClusterConfig = ClusterConfig()
    dedup: DedupConfig = DedupConfig()
    faces: FacesConfig = FacesConfig()
    select: SelectConfig = SelectConfig()
    write: WriteConfig = WriteConfig()

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value):
        if not value:
            raise ValueError("must name at least one shard, directory or pattern")
        return value

    @field_validator("reference")
    @classmethod
    def _latest_names_a_root(cls, value):
        if value is not None and value.startswith(LATEST_PREFIX) and not value[len(LATEST_PREFIX):].strip("/"):
            raise ValueError(f"{LATEST_PREFIX} needs the folder the runs are published under ({LATEST_PREFIX}s3://BUCKET/runs)")
        return value

    @model_validator(mode="after")
    def _steps_have_their_inputs(self):
        """An option whose stage reads a stage that is off (from the stages' declarations)."""
        from pipeline.stages import missing_inputs

        for stage, options in missing_inputs(self).items():
            raise ValueError(f"{', '.join(options)}: {_MISSING_STAGE.get(stage, f'requires the {stage} stage')}")
        provided = self.embed.provided
        if provided is not None and self.dfn.model is not None:
            raise ValueError("dfn.model with embed.provided: the DFN scorer runs inside a model pass; "
                             "give its scores as embed.provided.dfn_score instead")
        if self.faces.enabled and self.faces.source == "provided" and provided is None:
            raise ValueError("faces.source provided: the boxes come with DataComp metadata, set embed.provided")
        stored = self.embed.store_dims
        for option, section in (("cluster", self.cluster), ("select.dbp", self.select.dbp)):
            if stored is not None and section.dims is not None and section.dims > stored:
                raise ValueError(f"{option}.dims={section.dims} exceeds embed.store_dims={stored}: the stored "
                                 f"embeddings keep only {stored} dimensions")
        has_dfn = self.dfn.model is not None or (provided is not None and provided.dfn_score is not None)
        if self.select.dfn.enabled and not has_dfn:
            raise ValueError("select.dfn needs a DFN scorer: set dfn.model (or embed.provided.dfn_score)")
        return self

    @model_validator(mode="after")
    def _output_not_input(self):
        """A run clears its output's stage folders before writing, so an output that is, holds or lies in
        the input would delete the pool; compared by resolved location, not by spelling."""
        inputs = [self.input] if isinstance(self.input, str) else self.input
        output = _location(self.output)
        for given in inputs:
            how = _overlap(output, _location(str(given)))
            if how:
                raise ValueError(f"output {self.output} and input {given} overlap ({how}): "
                                 "a run must not write where it reads")
        if self.reference is not None and self.reference.startswith(LATEST_PREFIX):
            if _location(self.reference[len(LATEST_PREFIX):]) == output:
                raise ValueError("reference latest:ROOT: ROOT holds the runs, one folder each; the output must be one "
                                 "of those folders, not ROOT itself")
        elif self.reference is not None and _location(self.reference) == output:
            raise ValueError("reference must be an earlier run, not this run's output")
        return self


# Where a glob or brace pattern starts: the directory before it is the location the pattern reads.
_PATTERN_CHARS = "*?[{"


# What to tell a user whose option needs a stage that is off.
_MISSING_STAGE = {"embed": "requires image embeddings, set embed.model or embed.provided",
                  "faces": "requires face detection, set faces.enabled"}


def _location(url: str) -> tuple[str, tuple[str, ...]]:
    """(filesystem, path parts) of where a URL points: a local path through symlinks and '..'
    (os.path.realpath), an fsspec URL as its normalised bucket/key; a pattern as its fixed directory."""
    starts = [url.find(c) for c in _PATTERN_CHARS if c in url]
    if starts:
        head = url[: min(starts)]
        url = head.rsplit("/", 1)[0] if "/" in head else "."
        url = url or "/"
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() != "file":
        scheme = scheme.lower()
        key = posixpath.normpath("/" + rest)
        return _SCHEME_FAMILY.get(scheme, scheme), tuple(part for part in key.split("/") if part)
    local = rest if sep else url
    return "file", Path(os.path.realpath(os.path.expanduser(local))).parts


def _overlap(output: tuple[str, tuple[str, ...]], given: tuple[str, tuple[str, ...]]) -> str | None:
    """How two locations overlap ('the same location', 'output inside input', 'input inside output'), or None."""
    (out_fs, out_parts), (in_fs, in_parts) = output, given
    if out_fs != in_fs:
        return None
    if out_parts == in_parts:
        return "the same location"
    if out_parts[: len(in_parts)] == in_parts:
        return "output inside input"
    if in_parts[: len(out_parts)] == out_parts:
        return "input inside output"
    return None


def _section_at(parts: typing.Sequence[str]) -> type[BaseModel] | None:
    """The config section class at a dotted path (('select', 'clip') -> ScoreFilterConfig), None if there is none."""
    section: type[BaseModel] = CurateConfig
    for part in parts:
        field = section.model_fields.get(part)
        if field is None:
            return None
        candidates = (field.annotation, *typing.get_args(field.annotation))
        found = [t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found:
            return None
        section = found[0]
    return section


def _did_you_mean(loc: tuple[str, ...]) -> str:
    section = _section_at(loc[:-1])
    close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1) if section else []
    return f"; did you mean {'.'.join((*loc[:-1], close[0]))}?" if close else ""


def _source(loc: tuple[str, ...], path: str | None, overrides: list[str]) -> str:
    """Where the value at `loc` came from: the last override on or under that key, else the job file."""
    for text in reversed(overrides):
        parts = tuple(parse_override(text)[0])
        common = min(len(parts), len(loc))
        if common and parts[:common] == loc[:common]:
            return f"override {text}"
    where = path or "the config"
    if not loc and overrides:  # a rule across keys: the file and the overrides together
        return f"{where} with overrides {' '.join(overrides)}"
    return where


def _format_errors(exc: ValidationError, path: str | None, overrides: list[str]) -> str:
    """pydantic's errors as one line, each naming its key and where that key was set."""
    messages = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"])
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            problem = f"unknown key {key}{_did_you_mean(loc)}"
        elif err["type"] == "missing":
            problem = f"{key}: required"
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) or not loc else f" (got {got!r})"
            message = err["msg"].removeprefix("Value error, ")
            problem = f"{key}: {message}{shown}" if loc else message
        messages.append(f"{_source(loc, path, overrides)}: {problem}")
    return "; ".join(messages)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line, with its position."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """'embed.batch_size=256' -> (['embed', 'batch_size'], 256); the value is a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text}: the value is not valid YAML: {_yaml_problem(exc)}") from exc
    return parts, value


def _remove(data: dict, parts: list[str]) -> None:
    node = data
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted key. Setting one mode of a score filter (select.dfn.fraction) drops the other
    mode the file gave (select.dfn.threshold), unless that one is overridden as well."""
    parsed = [(text, *parse_override(text)) for text in overrides]
    overridden = {tuple(parts) for _, parts, _ in parsed}
    for _, parts, value in parsed:
        section = _section_at(parts[:-1])
        if value is None or section is None or parts[-1] not in getattr(section, "MODES", ()):
            continue
        for other in section.MODES:
            if other != parts[-1] and (*parts[:-1], other) not in overridden:
                _remove(data, [*parts[:-1], other])
    for text, parts, value in parsed:
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | None, overrides: list[str] = (), *, base: dict | None = None) -> CurateConfig:
    """Read a YAML job file (any fsspec URL), apply overrides, validate."""
    data: dict = dict(base or {})
    if path is not None:
        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a job file holds a mapping of keys at the top level")
        data.update(loaded)
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    try:
        return CurateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path, overrides)) from exc


def config_json_schema() -> dict:
    schema = CurateConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://curate.invalid/schemas/config.schema.json"
    return schema


def write_config_schema(path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_json_schema(), indent=2, sort_keys=True) + "\n")


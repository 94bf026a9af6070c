"""The one typed job configuration: YAML file + dotted-key overrides, validated by pydantic.

Every section forbids unknown keys, so a typo fails the run at start with the key's dotted name
instead of being silently ignored for hours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job config that cannot be run; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray address. null: RAY_ADDRESS, else a cluster started on this machine, else an "
        "embedded local Ray. 'local': always embedded. Anything else: that cluster.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded Ray (default: all).")


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
        ["jpg", "jpeg", "png", "webp"],
        min_length=1,
        description="Member extensions taken as the sample's image, in order of preference.",
    )


class BasicFilterConfig(Section):
    """DataComp's "basic" filter (algorithms.md section 1); defaults are DataComp's."""

    enabled: bool = True
    languages: list[str] = Field(["en"], description="Allowed fastText lid.176 top-1 languages; [] allows all.")
    min_caption_words: int = Field(3, ge=0, description="Keep when len(caption.split()) >= this (DataComp: > 2).")
    min_caption_chars: int = Field(6, ge=0, description="Keep when len(caption) >= this (DataComp: > 5).")
    min_image_side: int = Field(200, ge=0, description="Keep when min(original width, height) >= this.")
    max_aspect_ratio: float = Field(3.0, gt=0, description="Keep when max/min side <= this.")


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
        "actor; on CPU the cluster's CPUs shared among the actors, less what the decode tasks reserve.",
    )
    decode_workers: int | None = Field(
        None,
        ge=1,
        description="Decode + preprocess tasks running at once. null: on GPU the CPUs left beside the actors; "
        "on CPU one per 8 CPUs (at least 1).",
    )
    decode_cpus: float | None = Field(
        None, gt=0, description="CPUs Ray reserves per decode task. null: 1 on GPU, 0.5 on CPU."
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


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop samples whose image bytes (sha256) equal a kept sample's.")


class WriteConfig(Section):
    shard_size: int = Field(10_000, ge=1, description="Target samples per output shard (shards are balanced).")
    read_block_bytes: int = Field(
        8 * 2**20, ge=2**16, description="Read-ahead block for range reads of source shards."
    )


class CurateConfig(Section):
    input: str | list[str] = Field(
        ...,
        description="The pool: a directory of .tar shards, a glob, a brace pattern "
        "(pool/{00000000..00000099}.tar), or a list of these; any fsspec URL.",
    )
    output: str = Field(..., description="The run's output URL (local path, s3://, gs://, ...).")
    ray: RayConfig = RayConfig()
    ingest: IngestConfig = IngestConfig()
    basic_filter: BasicFilterConfig = BasicFilterConfig()
    embed: EmbedConfig = EmbedConfig()
    dfn: DfnConfig = DfnConfig()
    dedup: DedupConfig = DedupConfig()
    write: WriteConfig = WriteConfig()

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value):
        if not value:
            raise ValueError("must name at least one shard, directory or pattern")
        return value

    @model_validator(mode="after")
    def _output_not_input(self):
        inputs = [self.input] if isinstance(self.input, str) else self.input
        if any(str(self.output).rstrip("/") == str(i).rstrip("/") for i in inputs):
            raise ValueError("output must differ from input")
        return self


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (not in the config schema)")
        elif err["type"] == "missing":
            lines.append(f"{key}: required")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key}: {err['msg']}{shown}")
    return "\n  ".join(lines)


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
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | None, overrides: list[str] = (), *, base: dict | None = None) -> CurateConfig:
    """Read a YAML job file (any fsspec URL), apply overrides, validate."""
    data: dict = dict(base or {})
    source = path or "(overrides)"
    if path is not None:
        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data.update(loaded)
    data = apply_overrides(data, list(overrides))
    try:
        return CurateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {source}:\n  {_format_errors(exc)}") from exc


def config_json_schema() -> dict:
    schema = CurateConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://curate.invalid/schemas/config.schema.json"
    return schema


def write_config_schema(path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_json_schema(), indent=2, sort_keys=True) + "\n")


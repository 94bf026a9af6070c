"""open_clip models by name: which weights a config means, whether they are here, and loading them.

A model is named the way open_clip names it, in one of four forms:

- an architecture and a pretrained tag: `ViT-B-32` / `laion2b_s34b_b79k`, `ViT-H-14-quickgelu` / `dfn5b`;
- an architecture and a local checkpoint: `pretrained` is a `.safetensors` or `.bin` state dict, or an
  open_clip training checkpoint (`epoch_N.pt`); fsspec URLs (`s3://...`) are copied to a local cache;
  a bare file name not found in the working directory names the package's shipped weights of that
  name (`pipeline/assets`, e.g. `curate-dfn-rn16-64.safetensors`);
- `hf-hub:org/repo` (config and weights from the Hugging Face cache or hub), or `local-dir:/path`
  (a folder holding `open_clip_config.json` and the weights), with `pretrained: null`;
- an architecture and `pretrained: null`: random weights, seeded with RANDOM_INIT_SEED so that every
  actor and every run holds the same model.

`check_weights_available` runs before any stage (`preflight`), so a run that cannot get its weights
fails at once instead of after ingest. Loading goes through open_clip's own entry points only
(`create_model_and_transforms`, `create_model_from_pretrained`, `get_tokenizer`).

Architectures in `pipeline/model_configs/*.json` are registered with open_clip when this module is
imported; `register_model_configs(path)` adds more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import open_clip

from pipeline.config import ConfigError

log = logging.getLogger("curate")

RANDOM_INIT_SEED = 0
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
ASSET_DIR = Path(__file__).parent / "assets"  # weights shipped with the package (pipeline/assets/README.md)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference order
_HF_CONFIG = "open_clip_config.json"
_TRUE = {"1", "on", "yes", "true"}


def register_model_configs(path: str | Path) -> list[str]:
    """Register open_clip architecture configs (a .json file or a folder of them); returns their names."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    open_clip.add_model_config(path)
    return [f.stem for f in files]


PROJECT_MODELS: list[str] = register_model_configs(MODEL_CONFIG_DIR)


class ModelSpecError(ConfigError):
    """A model name / pretrained pair that cannot name any weights."""


class WeightsUnavailableError(FileNotFoundError):
    """The weights a config names cannot be had on this machine (the CLI reports it as a missing file)."""


@dataclass(frozen=True)
class ModelSpec:
    """What `model` / `pretrained` of a config section resolve to."""

    model: str
    pretrained: str | None
    kind: str  # random | tag | file | hf-hub | local-dir

    @property
    def label(self) -> str:
        return self.model if self.pretrained is None else f"{self.model} / {self.pretrained}"

    @property
    def key(self) -> str:
        """Equal for two specs that load the same model (loaded once)."""
        return f"{self.model}|{self.pretrained or ''}"


def resolve_spec(model: str, pretrained: str | None, section: str = "embed") -> ModelSpec:
    """Classify a config's model / pretrained pair; raises ModelSpecError naming the section's keys."""
    model = model.strip()
    if model.startswith(("hf-hub:", "local-dir:")):
        schema, identifier = model.split(":", 1)
        if not identifier:
            raise ModelSpecError(f"{section}.model {model!r}: empty {schema} id")
        if pretrained is not None:
            raise ModelSpecError(
                f"{section}.pretrained must be null when {section}.model is {schema}: (the {schema} source holds "
                f"the weights); got {pretrained!r}"
            )
        if schema == "local-dir":
            return ModelSpec(f"local-dir:{os.path.abspath(os.path.expanduser(identifier))}", None, "local-dir")
        return ModelSpec(model, None, "hf-hub")
    if model not in open_clip.list_models():
        raise ModelSpecError(
            f"{section}.model {model!r} is not an open_clip architecture (open_clip.list_models()), "
            "an 'hf-hub:org/repo' id or a 'local-dir:/path'"
        )
    if pretrained is None:
        return ModelSpec(model, None, "random")
    if open_clip.get_pretrained_cfg(model, pretrained):
        return ModelSpec(model, pretrained.lower().replace("-", "_"), "tag")
    if _looks_like_path(pretrained):
        if "://" not in pretrained:
            pretrained = _local_path(pretrained)
        return ModelSpec(model, pretrained, "file")
    tags = open_clip.list_pretrained_tags_by_model(model)
    raise ModelSpecError(
        f"{section}.pretrained {pretrained!r} is neither a pretrained tag of {model} "
        f"(known: {', '.join(tags) or 'none'}) nor a checkpoint path ({', '.join(CHECKPOINT_SUFFIXES)})"
    )


def _local_path(value: str) -> str:
    """An absolute path; a bare file name that is not in the working directory but is one of the
    package's shipped weights (pipeline/assets) names that file, wherever the package is installed."""
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.exists(path) and os.path.basename(value) == value and (ASSET_DIR / value).is_file():
        return str(ASSET_DIR / value)
    return path


def _looks_like_path(value: str) -> bool:
    return "://" in value or "/" in value or os.sep in value or value.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(value)


def config_specs(config) -> dict[str, ModelSpec]:
    """{'embed': spec, 'dfn': spec} for the models a CurateConfig names (dfn only when set)."""
    specs: dict[str, ModelSpec] = {}
    if config.embed.model is not None:
        specs["embed"] = resolve_spec(config.embed.model, config.embed.pretrained, "embed")
    if config.dfn.model is not None:
        if "embed" not in specs:
            raise ModelSpecError("dfn.model is set but embed.model is not: the DFN scorer runs inside the embed stage")
        specs["dfn"] = resolve_spec(config.dfn.model, config.dfn.pretrained, "dfn")
    return specs


# --- where the weights are ---------------------------------------------------------------------


def hf_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> str:
    """The Hugging Face hub cache as the environment names it now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


@dataclass(frozen=True)
class _HubNeed:
    repo: str
    filenames: tuple[str, ...]  # any one of them will do
    what: str


def _hub_weights(spec: ModelSpec) -> list[_HubNeed]:
    """The hub files open_clip will ask for to load `spec` (empty when it reads no hub file)."""
    if spec.kind == "hf-hub":
        repo = spec.model.split(":", 1)[1]
        needs = [_HubNeed(repo, (_HF_CONFIG,), "model config"), _HubNeed(repo, _HF_WEIGHTS, "weights")]
        config = _cached_json(repo, _HF_CONFIG)
        text_cfg = (config or {}).get("model_cfg", {}).get("text_cfg", {})
        return needs + _hub_text_needs(text_cfg)
    if spec.kind == "tag":
        cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
        text_cfg = (open_clip.get_model_config(spec.model) or {}).get("text_cfg", {})
        hub = cfg.get("hf_hub", "")
        if not hub:
            return _hub_text_needs(text_cfg)
        repo, filename = os.path.split(hub)
        candidates = _HF_WEIGHTS if not filename else _safe_alternatives(filename) + (filename,)
        return [_HubNeed(repo, candidates, "weights")] + _hub_text_needs(text_cfg)
    if spec.kind in ("random", "file"):
        return _hub_text_needs((open_clip.get_model_config(spec.model) or {}).get("text_cfg", {}))
    return []


def _hub_text_needs(text_cfg: dict) -> list[_HubNeed]:
    """HF tokenizers and HF text towers are fetched from the hub even when the CLIP weights are local."""
    needs = []
    if text_cfg.get("hf_tokenizer_name"):
        needs.append(_HubNeed(text_cfg["hf_tokenizer_name"], ("tokenizer_config.json", "tokenizer.json"), "tokenizer"))
    if text_cfg.get("hf_model_name"):
        needs.append(_HubNeed(text_cfg["hf_model_name"], ("config.json",), "text tower config"))
    return needs


def _safe_alternatives(filename: str) -> tuple[str, ...]:
    if filename == _HF_WEIGHTS[1]:
        return (_HF_WEIGHTS[0],)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors",)
    return ()


def _cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
    return found if isinstance(found, str) else None


def _cached_json(repo: str, filename: str) -> dict | None:
    path = _cached(repo, filename)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _missing(spec: ModelSpec) -> list[str]:
    """Human-readable list of what `spec` needs and this machine cannot get."""
    missing = []
    if spec.kind == "file" and not _file_exists(spec.pretrained):
        missing.append(f"checkpoint file {spec.pretrained} does not exist")
    elif spec.kind == "local-dir":
        folder = Path(spec.model.split(":", 1)[1])
        if not (folder / _HF_CONFIG).is_file():
            missing.append(f"{folder / _HF_CONFIG} does not exist")
        if not any(next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pth")):
            missing.append(f"no .safetensors / .bin / .pth weights in {folder}")
    offline = hf_offline()
    for need in _hub_weights(spec):
        if any(_cached(need.repo, name) for name in need.filenames):
            continue
        wanted = " or ".join(need.filenames)
        if offline:
            missing.append(f"{need.what}: {wanted} of {need.repo} is not in the Hugging Face cache {hf_cache_dir()} "
                           "and HF_HUB_OFFLINE is set")
            continue
        try:
            from huggingface_hub import file_exists

            if not any(file_exists(need.repo, name) for name in need.filenames):
                missing.append(f"{need.what}: the hub repo {need.repo} has no {wanted}")
        except Exception as exc:  # no network, no such repo, gated repo
            missing.append(f"{need.what}: {wanted} of {need.repo} is not cached and the hub is unreachable "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())})")
    if spec.kind == "tag" and not open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("hf_hub"):
        url = open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("url", "")
        cached = os.path.join(hf_cache_dir(), os.path.basename(url))
        if url and offline and not os.path.isfile(cached):
            missing.append(f"weights: {url} is not in {cached} and HF_HUB_OFFLINE is set")
    return missing


def _file_exists(url: str) -> bool:
    if "://" not in url:
        return os.path.isfile(url)
    import fsspec

    fsys, path = fsspec.core.url_to_fs(url)
    return fsys.isfile(path)


def _provide_help(section: str, spec: ModelSpec) -> str:
    repos = sorted({need.repo for need in _hub_weights(spec)}) or ["ORG/REPO"]
    repo = repos[0]
    return (
        "provide the weights in one of three ways: "
        f"(1) a local checkpoint: set {section}.pretrained to a .safetensors or .bin state dict or an open_clip "
        f"training checkpoint (.pt) of {spec.model.split(':', 1)[-1]}; "
        f"(2) pre-populate the Hugging Face cache: on a connected machine run `hf download {repo}` "
        f"(older huggingface_hub: `huggingface-cli download {repo}`) with HF_HOME set to a folder, copy that "
        f"folder here and point HF_HOME at it (this run looks in {hf_cache_dir()}); "
        f"(3) name an hf-hub id whose files are already in that cache: {section}.model: hf-hub:{repo} and "
        f"{section}.pretrained: null"
    )


def check_weights_available(specs: dict[str, ModelSpec]) -> None:
    """Raise WeightsUnavailableError naming every model whose weights cannot be had, and how to provide them.

    The message is one line (the command line prints it as the run's one error line).
    """
    problems = []
    for section, spec in specs.items():
        missing = _missing(spec)
        if missing:
            problems.append(f"{section} model {spec.label}: weights unavailable ({'; '.join(missing)}); "
                            + _provide_help(section, spec))
    if problems:
        raise WeightsUnavailableError(" | ".join(problems))


def preflight(config) -> dict[str, ModelSpec]:
    """Resolve the config's models and check their weights; called before any stage runs."""
    specs = config_specs(config)
    for section, spec in specs.items():
        if spec.kind == "random":
            log.warning("%s.pretrained is null: %s runs with random weights (seed %d)", section, spec.model, RANDOM_INIT_SEED)
    check_weights_available(specs)
    check_dims(config, specs)
    return specs


def check_dims(config, specs: dict[str, ModelSpec]) -> None:
    """Reduced dimensions the embedder cannot give fail before any work, naming the option."""
    asked = [(option, dims) for option, dims in (("embed.store_dims", config.embed.store_dims),
                                                  ("cluster.dims", config.cluster.dims),
                                                  ("select.dbp.dims", config.select.dbp.dims)) if dims is not None]
    if not asked or "embed" not in specs:
        return
    dim = embed_dim(specs["embed"])
    for option, dims in asked:
        if dims > dim:
            raise ModelSpecError(f"{option}={dims} exceeds the {dim}-d embeddings of embed.model {specs['embed'].model}")


def weights_identity(spec: ModelSpec) -> dict:
    """What identifies the weights beyond the spec (a local checkpoint's size and time), for resume."""
    if spec.kind != "file":
        return {}
    try:
        import fsspec

        fsys, path = fsspec.core.url_to_fs(spec.pretrained)
        info = fsys.info(path)
        return {"size": info.get("size"), "mtime": str(info.get("mtime") or info.get("LastModified") or info.get("ETag"))}
    except (OSError, ValueError):
        return {}


# --- loading -------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """An open_clip model in eval mode with its tokenizer and inference preprocessing."""

    spec: ModelSpec
    model: Any
    preprocess: Callable  # open_clip's inference transform: PIL image -> normalised float tensor
    tokenizer: Callable  # list[str] -> LongTensor [n, context_length]
    preprocess_cfg: dict  # model.visual.preprocess_cfg, enough to rebuild `preprocess` elsewhere


def local_checkpoint(url: str) -> str:
    """A local path for a checkpoint; fsspec URLs are copied once into ~/.cache/curate/checkpoints."""
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://")
    import fsspec

    fsys, path = fsspec.core.url_to_fs(url)
    info = fsys.info(path)
    stamp = f"{url}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"
    folder = os.path.join(os.path.expanduser("~/.cache/curate/checkpoints"), hashlib.sha256(stamp.encode()).hexdigest()[:16])
    local = os.path.join(folder, os.path.basename(path))
    if not os.path.isfile(local):
        os.makedirs(folder, exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}"
        fsys.get_file(path, tmp)
        os.replace(tmp, local)
    return local


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load through open_clip's own API, on the CPU in fp32 (callers move it to their device)."""
    import torch

    cache_dir = hf_cache_dir()
    if spec.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=None, cache_dir=cache_dir)
    elif spec.kind in ("tag", "file"):
        pretrained = spec.pretrained if spec.kind == "tag" else local_checkpoint(spec.pretrained)
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained, cache_dir=cache_dir)
    else:
        model, preprocess = open_clip.create_model_from_pretrained(spec.model, cache_dir=cache_dir)
    model.eval()
    tokenizer = get_tokenizer(spec.model)
    return LoadedModel(spec, model, preprocess, tokenizer, dict(model.visual.preprocess_cfg))


def get_tokenizer(model: str):
    """open_clip's tokenizer for a model name, reading the hub cache this environment names."""
    return open_clip.get_tokenizer(model, cache_dir=hf_cache_dir())


def embed_dim(spec: ModelSpec) -> int:
    """The dimension of the model's embeddings, from its open_clip config (no weights needed)."""
    if spec.kind == "hf-hub":
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(spec.model.split(":", 1)[1], _HF_CONFIG, cache_dir=hf_cache_dir())
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle).get("model_cfg")
    else:
        config = open_clip.get_model_config(spec.model)
    if not config or "embed_dim" not in config:
        raise ModelSpecError(f"no open_clip config with embed_dim for {spec.model}")
    return int(config["embed_dim"])


def unique_specs(specs: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    """spec.key -> spec: a model named twice (embedder and DFN scorer) is loaded once."""
    return {spec.key: spec for spec in specs.values()}


def describe(specs: Iterable[ModelSpec]) -> str:
    return ", ".join(spec.label for spec in specs)

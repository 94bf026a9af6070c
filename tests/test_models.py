"""Model specs, the offline weights check, and loading: checkpoints round-trip to identical embeddings."""

import json

import numpy as np
import open_clip
import pytest
import torch

from pipeline import models
from pipeline.models import ModelSpecError, WeightsUnavailableError, check_weights_available, resolve_spec
from tests.helpers import run_config

TINY = "curate-vit-tiny-64"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache."""
    import huggingface_hub.constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def put_in_hub_cache(cache, repo: str, files: dict[str, bytes]) -> None:
    """Lay files out the way huggingface_hub caches a download of `repo` at revision main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


@pytest.fixture(scope="module")
def trained_like():
    """A tiny model with weights of its own (not the seeded random init), and a few inputs."""
    torch.manual_seed(123)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    tokens = open_clip.get_tokenizer(TINY)(["a red square", "two blue circles on grass", "x"])
    with torch.inference_mode():
        expected = model.encode_image(images), model.encode_text(tokens)
    return model, images, tokens, expected


def embeddings_of(loaded, images, tokens):
    with torch.inference_mode():
        return loaded.model.encode_image(images), loaded.model.encode_text(tokens)


def test_project_model_configs_are_registered_with_open_clip():
    assert TINY in models.PROJECT_MODELS
    assert TINY in open_clip.list_models()
    assert models.embed_dim(resolve_spec(TINY, None)) == 64


def test_specs_resolve_to_tag_file_hub_dir_or_random(tmp_path):
    assert resolve_spec("ViT-B-32", "laion2b_s34b_b79k").kind == "tag"
    assert resolve_spec("ViT-H-14-quickgelu", "dfn5b").kind == "tag"
    assert resolve_spec("ViT-L-14-quickgelu", "DFN2B").pretrained == "dfn2b"
    assert resolve_spec("ViT-B-32", "ckpt/epoch_3.pt").kind == "file"
    assert resolve_spec("ViT-B-32", "s3://bucket/model.safetensors").pretrained == "s3://bucket/model.safetensors"
    assert resolve_spec("hf-hub:apple/DFN5B-CLIP-ViT-H-14", None).kind == "hf-hub"
    assert resolve_spec(f"local-dir:{tmp_path}", None).kind == "local-dir"
    assert resolve_spec(TINY, None).kind == "random"
    with pytest.raises(ModelSpecError, match="embed.pretrained 'laion5b' is neither a pretrained tag of ViT-B-32"):
        resolve_spec("ViT-B-32", "laion5b")
    with pytest.raises(ModelSpecError, match="not an open_clip architecture"):
        resolve_spec("ViT-Q-99", None)
    with pytest.raises(ModelSpecError, match="dfn.pretrained must be null"):
        resolve_spec("hf-hub:apple/DFN5B-CLIP-ViT-H-14", "dfn5b", "dfn")


def test_dfn_scorer_needs_an_embedder():
    with pytest.raises(ModelSpecError, match="dfn.model is set but embed.model is not"):
        models.config_specs(run_config("in", "out", dfn={"model": TINY}))


def test_same_model_twice_is_one_model():
    config = run_config("in", "out", embed={"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
                        dfn={"model": "ViT-B-32", "pretrained": "LAION2B_S34B_B79K"})
    specs = models.config_specs(config)
    assert len(specs) == 2 and len(models.unique_specs(specs)) == 1


def test_offline_without_cache_names_the_missing_weights_and_three_ways(offline):
    specs = {
        "embed": resolve_spec("ViT-B-32", "laion2b_s34b_b79k"),
        "dfn": resolve_spec("ViT-H-14-quickgelu", "dfn5b", "dfn"),
    }
    with pytest.raises(WeightsUnavailableError) as caught:
        check_weights_available(specs)
    message = str(caught.value)
    assert "embed model ViT-B-32 / laion2b_s34b_b79k: weights unavailable" in message
    assert "dfn model ViT-H-14-quickgelu / dfn5b: weights unavailable" in message
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "apple/DFN5B-CLIP-ViT-H-14" in message
    assert "HF_HUB_OFFLINE" in message and str(offline) in message
    assert "embed.pretrained to a .safetensors or .bin state dict or an open_clip training checkpoint" in message
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "HF_HOME" in message
    assert "embed.model: hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    with pytest.raises(WeightsUnavailableError, match="apple/DFN2B-CLIP-ViT-L-14"):
        check_weights_available({"embed": resolve_spec("hf-hub:apple/DFN2B-CLIP-ViT-L-14", None)})
    with pytest.raises(WeightsUnavailableError, match="checkpoint file /nowhere/w.safetensors does not exist"):
        check_weights_available({"embed": resolve_spec(TINY, "/nowhere/w.safetensors")})
    check_weights_available({"embed": resolve_spec(TINY, None)})  # random weights need nothing


def test_offline_with_the_weights_in_the_cache_passes(offline):
    put_in_hub_cache(offline, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", {"open_clip_model.safetensors": b"x"})
    check_weights_available({"embed": resolve_spec("ViT-B-32", "laion2b_s34b_b79k")})


@pytest.mark.parametrize("form", ["safetensors", "bin", "training_checkpoint"])
def test_local_checkpoint_gives_the_embeddings_of_the_model_it_was_saved_from(form, trained_like, tmp_path):
    model, images, tokens, (image_ref, text_ref) = trained_like
    state = model.state_dict()
    if form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif form == "bin":
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, path)
    else:  # what open_clip_train writes: DDP-prefixed state dict beside the optimizer state
        path = tmp_path / "epoch_1.pt"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": optimizer.state_dict()}, path)
    spec = resolve_spec(TINY, str(path))
    check_weights_available({"embed": spec})
    image, text = embeddings_of(models.load_model(spec), images, tokens)
    assert torch.equal(image, image_ref) and torch.equal(text, text_ref)


def test_hub_id_in_the_cache_loads_offline(offline, trained_like):
    from safetensors.torch import save

    model, images, tokens, (image_ref, text_ref) = trained_like
    config = {"model_cfg": open_clip.get_model_config(TINY), "preprocess_cfg": {"interpolation": "bicubic"}}
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    put_in_hub_cache(offline, "curate/tiny", {"open_clip_config.json": json.dumps(config).encode(),
                                              "open_clip_model.safetensors": weights})
    spec = resolve_spec("hf-hub:curate/tiny", None)
    check_weights_available({"embed": spec})
    loaded = models.load_model(spec)
    assert models.embed_dim(spec) == 64
    image, text = embeddings_of(loaded, images, tokens)
    assert torch.equal(image, image_ref) and torch.equal(text, text_ref)


def test_random_weights_are_the_same_everywhere():
    a = models.load_model(resolve_spec(TINY, None)).model.state_dict()
    torch.manual_seed(999)  # the caller's RNG state does not matter
    b = models.load_model(resolve_spec(TINY, None)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(models.RANDOM_INIT_SEED)
    reference = open_clip.create_model(TINY).state_dict()
    assert all(np.array_equal(a[k].numpy(), reference[k].numpy()) for k in a)


def test_local_dir_loads_like_the_hub(trained_like, tmp_path):
    from safetensors.torch import save_file

    model, images, tokens, (image_ref, text_ref) = trained_like
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(TINY)}))
    spec = resolve_spec(f"local-dir:{tmp_path}", None)
    with pytest.raises(WeightsUnavailableError, match="no .safetensors / .bin / .pth weights"):
        check_weights_available({"embed": spec})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    check_weights_available({"embed": spec})
    image, text = embeddings_of(models.load_model(spec), images, tokens)
    assert torch.equal(image, image_ref) and torch.equal(text, text_ref)

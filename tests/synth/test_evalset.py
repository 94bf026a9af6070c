"""The held-out evaluation set: every concept, balanced, clean, reproducible, and never a pool's image."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from PIL import Image

from pipeline.synth import CONCEPTS, synthesize
from pipeline.synth.captions import EN_COLOURS, EN_SHAPES
from pipeline.synth.evalset import class_name, safe_name, synthesize_eval_set


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_eval_set_layout_balance_and_reproducibility(tmp_path):
    summary = synthesize_eval_set(str(tmp_path / "a"), per_class=2, seed=5, pairs_per_class=1, shard_size=100)
    assert (summary["classes"], summary["images"], summary["pairs"]) == (256, 512, 256)
    classes = tmp_path / "a" / "classes"
    names = json.loads((classes / "classes.json").read_text())
    assert len(set(names.values())) == 256 and set(names) == {p.name for p in classes.iterdir() if p.is_dir()}
    assert names["red_circle_on_a_striped_background"] == "red circle on a striped background"
    assert all(folder == safe_name(name) for folder, name in names.items())
    for folder in names:
        images = sorted((classes / folder).glob("*.jpg"))
        assert len(images) == 2
        with Image.open(images[0]) as image:
            assert min(image.size) >= 200 and max(image.size) / min(image.size) <= 3  # no small or extreme image
    # pairs: one per concept, each caption in English naming the concept's colour and shape
    pairs = tmp_path / "a" / "pairs"
    assert json.loads((pairs / "sizes.json").read_text()) == {f"{i:08d}.tar": 100 if i < 2 else 56 for i in range(3)}
    seen = set()
    for shard in sorted(pairs.glob("*.tar")):
        with tarfile.open(shard) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                concept = next(c for c in CONCEPTS if class_name(c) == meta["class"])
                caption = members[name.replace(".json", ".txt")].decode()
                assert caption == meta["caption"]
                assert any(w in caption for w in EN_COLOURS[concept.colour_name])
                assert any(w in caption for w in EN_SHAPES[concept.shape_name])
                seen.add(concept.id)
    assert seen == set(range(256))
    # the same arguments give the same bytes, whatever the number of worker processes
    synthesize_eval_set(str(tmp_path / "b"), per_class=2, seed=5, pairs_per_class=1, shard_size=100, workers=1)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # rewriting a smaller set in place leaves nothing of the larger one
    synthesize_eval_set(str(tmp_path / "b"), per_class=1, seed=5, shard_size=100)
    assert len(list((tmp_path / "b" / "classes").rglob("*.jpg"))) == 256


def test_no_eval_image_is_an_image_of_a_pool_with_the_same_seed(tmp_path):
    synthesize(str(tmp_path / "pool"), samples=300, seed=4, shard_size=300)
    synthesize_eval_set(str(tmp_path / "eval"), per_class=1, seed=4)
    with tarfile.open(tmp_path / "pool" / "00000000.tar") as archive:
        pool = {hashlib.sha256(archive.extractfile(m).read()).digest()
                for m in archive.getmembers() if m.name.endswith(".jpg")}
    held_out = {hashlib.sha256(p.read_bytes()).digest() for p in (tmp_path / "eval" / "classes").rglob("*.jpg")}
    assert len(pool) > 250 and len(held_out) == 256 and not pool & held_out

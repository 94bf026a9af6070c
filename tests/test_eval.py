"""`curate eval`: metrics equal hand computations, arms are cut and materialised deterministically,
a run directory and its uid file train on the same samples, and the loop end to end (open_clip's
trainer for a few steps) writes eval.json and the run report's Evaluation section."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import evaluate as ev
from pipeline.cli import main
from pipeline.io.datacomp import read_subset, write_subset
from pipeline.io.tar import TarWriter
from pipeline.runner import run_pipeline
from tests.helpers import read_metadata, run_config


@pytest.fixture(scope="module")
def curated(synth_pool, tmp_path_factory, ray_local):
    """A curated run of the session pool (basic filter, exact and pHash dedup: no model needed)."""
    out = tmp_path_factory.mktemp("eval-run") / "run"
    run_pipeline(run_config(synth_pool, out))
    return out


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The held-out set as `curate synth --eval-set` writes it: 256 classes of one image, 256 pairs."""
    out = tmp_path_factory.mktemp("heldout")
    assert main(["synth", "--eval-set", "--out", str(out), "--per-class", "1", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def index(synth_pool, tmp_path_factory):
    return ev.index_pool(str(synth_pool), str(tmp_path_factory.mktemp("index")))


# -- metrics by hand -------------------------------------------------------------------------------

class HandTextTower(torch.nn.Module):
    """A text encoder whose embedding of each text is written by hand (token id = position in TEXTS)."""

    TEXTS = {"a cat": [2.0, 0.0, 0.0], "the cat": [0.0, 3.0, 0.0], "a dog": [0.0, 0.0, 1.0], "the dog": [0.0, 0.0, 5.0]}

    def __init__(self):
        super().__init__()
        self.table = torch.tensor(list(self.TEXTS.values()))

    def tokenizer(self, texts):
        names = list(self.TEXTS)
        return torch.tensor([names.index(t) for t in texts])

    def encode_text(self, tokens, normalize=False):
        features = self.table[tokens]
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def test_zero_shot_classifier_and_accuracy_equal_a_hand_computation():
    tower = HandTextTower()
    classifier = ev.zero_shot_classifier(tower, tower.tokenizer, ["cat", "dog"], ["a {}", "the {}"])
    # cat: mean of (1,0,0) and (0,1,0), normalised; dog: (0,0,1) twice
    s = 2 ** -0.5
    assert classifier.shape == (3, 2)
    assert np.allclose(classifier.numpy(), [[s, 0], [s, 0], [0, 1]], atol=1e-6)
    images = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.6], [0.9, 0.0, 0.1], [0.0, 0.0, 1.0]])
    # logits (s*x0 + s*x1, x2): (.71, 0) cat; (.35, .6) dog; (.64, .1) cat; (0, 1) dog
    labels = [0, 1, 1, 0]
    accuracy = ev.zero_shot_accuracy(images, classifier.numpy(), labels, ks=(1, 2))
    assert accuracy == {"zeroshot_top1": 0.5, "zeroshot_top2": 1.0}


def test_retrieval_recall_equals_a_hand_computation():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = np.array([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    # cosines, rows images, columns texts:  i0: .8  1  0 | i1: .6  0  1 | i2: .96  .6  .8
    # image -> text: partner ranks (others scoring >= the partner): i0 1, i1 2, i2 1
    # text -> image (columns): t0's partner .8 (i2 .96 ahead): 1; t1's 0 (i0 1, i2 .6 ahead): 2;
    # t2's .8 (i1 1 ahead): 1
    result = ev.retrieval_recall(images, texts, ks=(1, 2, 3))
    assert result == {"i2t_r1": 0.0, "i2t_r2": 2 / 3, "i2t_r3": 1.0, "t2i_r1": 0.0, "t2i_r2": 2 / 3, "t2i_r3": 1.0}
    # a tie with the partner counts against the query: identical embeddings find nothing at 1
    same = np.ones((4, 2)) / 2 ** 0.5
    assert ev.retrieval_recall(same, same, ks=(1, 4)) == {"i2t_r1": 0.0, "i2t_r4": 1.0, "t2i_r1": 0.0, "t2i_r4": 1.0}
    # a perfect model finds every partner first
    eye = np.eye(5)
    assert set(ev.retrieval_recall(eye, eye, ks=(1,)).values()) == {1.0}


def test_mean_and_spread_over_seeds():
    seeds = [{"metrics": dict.fromkeys(ev.METRICS, v)} for v in (0.2, 0.4, 0.9)]
    mean, std = ev.summarise(seeds)
    assert mean["zeroshot_top1"] == pytest.approx(0.5)
    assert std["t2i_r5"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)  # sample standard deviation
    assert ev.summarise(seeds[:1]) == (dict.fromkeys(ev.METRICS, 0.2), dict.fromkeys(ev.METRICS))


# -- arms, the random baseline and materialising -------------------------------------------------------

def test_random_baseline_draws_from_the_readable_samples_deterministically_per_seed(synth_pool, index):
    truth = pq.read_table(synth_pool / "truth" / "truth.parquet").to_pandas()
    trainable = set(ev.trainable_uids(index))
    unreadable = {u for u, d in zip(truth["uid"], truth["defects"]) if {"corrupt_image", "missing_caption"} & set(d)}
    assert unreadable and not unreadable & trainable
    assert trainable == set(truth["uid"]) - unreadable  # every other sample, noisy or not, can be drawn
    uids = sorted(trainable)
    first, again, other = ev.cut(uids, 200, 0), ev.cut(list(reversed(uids)), 200, 0), ev.cut(uids, 200, 1)
    assert first == again  # the order the uids come in does not matter
    assert len(first) == len(set(first)) == 200 and set(first) <= trainable
    assert first != other and len(set(first) ^ set(other)) > 100
    with pytest.raises(ev.EvalError):
        ev.cut(uids, len(uids) + 1, 0)


def _members(folder) -> list[tuple[str, bytes]]:
    found = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as archive:
            found.extend((m.name, archive.extractfile(m).read()) for m in archive.getmembers())
    return found


def test_a_run_directory_and_its_uid_file_train_on_the_same_samples(curated, index, tmp_path):
    table = read_metadata(curated)
    kept = [u for u, k in zip(table.column("uid").to_pylist(), table.column("kept").to_pylist()) if k]
    subset = tmp_path / "selection.npy"
    write_subset(str(subset), kept)
    by_run, by_file = ev.load_arm(f"run={curated}"), ev.load_arm(str(subset))
    assert (by_run.kind, by_file.kind, by_file.name) == ("run", "subset", "selection")
    assert by_run.uids == by_file.uids == sorted(kept)
    bare = tmp_path / "bare"  # a run without its subset file: the kept rows of its metadata
    shutil.copytree(curated / "metadata", bare / "metadata")
    assert ev.load_arm(str(bare)).uids == sorted(kept)
    size = len(kept) - 17
    cut_run, cut_file = ev.cut(by_run.uids, size, 2), ev.cut(by_file.uids, size, 2)
    assert cut_run == cut_file
    ev.materialise(index, cut_run, str(tmp_path / "a"), shard_size=100)
    ev.materialise(index, cut_file, str(tmp_path / "b"), shard_size=100)
    a, b = _members(tmp_path / "a"), _members(tmp_path / "b")
    assert a == b
    assert [name.split(".")[0] for name, _ in a[::3]] == cut_run  # {uid}.jpg/.txt/.json in training order
    sizes = json.loads((tmp_path / "a" / "sizes.json").read_text())
    assert sum(sizes.values()) == size and max(sizes.values()) - min(sizes.values()) <= 1
    # the bytes are the pool's, as the run itself wrote them
    written = dict(_members(curated / "shards"))
    assert all(written[name] == data for name, data in a)


def test_a_uid_outside_the_pool_is_refused(index, tmp_path):
    with pytest.raises(ev.EvalError, match="not trainable samples of the pool"):
        ev.materialise(index, ["f" * 32], str(tmp_path / "x"))


def test_labelled_images_from_a_folder_and_from_shards_with_a_class_field_are_the_same(heldout, tmp_path):
    folder = ev.read_labelled(str(heldout / "classes"))
    assert len(folder.classnames) == 256 and len(folder.images) == 256
    assert "red circle on a striped background" in folder.classnames
    shards = tmp_path / "labelled"
    shards.mkdir()
    with open(shards / "00000000.tar", "wb") as handle, TarWriter(handle) as tar:
        for i, (image, label) in enumerate(zip(folder.images, folder.labels)):
            tar.add(f"{i:06d}.jpg", image)
            if i % 2:
                tar.add(f"{i:06d}.cls", folder.classnames[label].encode())
            else:
                tar.add(f"{i:06d}.json", json.dumps({"class": folder.classnames[label]}).encode())
    from_shards = ev.read_labelled(str(shards))
    assert from_shards.images == folder.images
    assert [from_shards.classnames[i] for i in from_shards.labels] == [folder.classnames[i] for i in folder.labels]
    pairs = ev.read_pairs(str(heldout / "pairs"))
    assert len(pairs.images) == 256 and all(len(c.split()) > 4 for c in pairs.captions)


# -- end to end --------------------------------------------------------------------------------------

def test_curate_eval_end_to_end_writes_eval_json_and_the_report_section(synth_pool, curated, heldout, tmp_path, capsys):
    assert '<section id="evaluation" class="skipped">' in (curated / "report.html").read_text()
    out = tmp_path / "eval"
    args = ["eval", "--pool", str(synth_pool), "--arm", f"curated={curated}", "--heldout", str(heldout),
            "--out", str(out), "--seeds", "1", "--steps", "2", "--batch-size", "16", "--warmup", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    kept = sorted(read_subset(str(curated / "datacomp_subset.npy")))
    assert result["subset_size"] == len(kept) and result["steps"] == 2 and result["seeds"] == [0]
    assert result["heldout"]["classification"]["classes"] == 256 and result["heldout"]["pairs"]["pairs"] == 256
    assert [a["name"] for a in result["arms"]] == ["curated", "random"]
    for arm in result["arms"]:
        [entry] = arm["seeds"]
        assert entry["seed"] == 0 and set(entry["metrics"]) == set(ev.METRICS)
        assert all(0.0 <= v <= 1.0 for v in entry["metrics"].values())
        assert arm["mean"] == entry["metrics"] and arm["std"] == dict.fromkeys(ev.METRICS)  # one seed: no spread
        uids = (out / "arms" / arm["name"] / "seed-0" / "uids.txt").read_text().split()
        assert len(uids) == len(set(uids)) == len(kept)  # the random baseline has exactly the curated arm's size
        assert (sorted(uids) == kept) == (arm["name"] == "curated")
        assert sorted(uids) == sorted(read_subset(str(out / "arms" / arm["name"] / "seed-0" / "subset.npy")))
    assert "curated" in printed and "random" in printed and "zeroshot_top1" in printed
    # the run got a copy and its report the section
    copy = json.loads((curated / "eval" / "eval.json").read_text())
    assert copy["run_arm"] == "curated" and copy["arms"] == result["arms"]
    page = (curated / "report.html").read_text()
    assert '<section id="evaluation"><h2>Evaluation</h2>' in page
    assert 'id="eval-table"' in page and 'id="eval-plot"' in page
    # a rerun with the same settings reuses the checkpoints and measures the same numbers
    assert main(args + ["--no-report"]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert all(s["reused_checkpoint"] for a in again["arms"] for s in a["seeds"])
    assert [a["mean"] for a in again["arms"]] == [a["mean"] for a in result["arms"]]

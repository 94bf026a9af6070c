"""Face detection on real photographs (scikit-image's and matplotlib's sample images, shipped in
their wheels), the PASS-style drop and the DataComp-style blur through whole runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, FacesConfig, load_config
from pipeline.faces import FaceDetector, blur_faces, box_pixels
from pipeline.runner import run_pipeline
from tests.helpers import make_tar, read_metadata, run_config

skimage_data = pytest.importorskip("skimage.data")
SKIMAGE = os.path.dirname(skimage_data.__file__)

# (file, faces in it): photographs a person labelled by looking at them
WITH_FACE = ["astronaut.png"]
WITHOUT_FACE = ["coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "coins.png", "moon.png",
                "horse.png", "page.png", "motorcycle_left.png", "retina.jpg"]


def photo(name: str) -> bytes:
    return open(os.path.join(SKIMAGE, name), "rb").read()


def grace_hopper() -> bytes:
    import matplotlib

    return open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"), "rb").read()


@pytest.fixture(scope="module")
def detector():
    return FaceDetector.from_config(FacesConfig())


def test_a_face_is_found_where_a_face_is(detector):
    for data in [photo("astronaut.png"), grace_hopper()]:
        boxes = detector.detect_bytes(data)
        assert len(boxes) == 1
        x0, y0, x1, y1 = boxes[0]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    # Eileen Collins' face in astronaut.png lies around pixel (230, 120) of 512 x 512
    x0, y0, x1, y1 = detector.detect_bytes(photo("astronaut.png"))[0]
    assert x0 < 230 / 512 < x1 and y0 < 120 / 512 < y1


@pytest.mark.parametrize("name", WITHOUT_FACE)
def test_no_face_is_found_where_none_is(detector, name):
    assert detector.detect_bytes(photo(name)) == []


def test_detection_is_deterministic_and_independent_of_the_search_size(detector):
    data = photo("astronaut.png")
    assert detector.detect_bytes(data) == detector.detect_bytes(data)
    small = FaceDetector.from_config(FacesConfig(max_side=256)).detect_bytes(data)
    assert len(small) == 1 and np.allclose(small[0], detector.detect_bytes(data)[0], atol=0.03)


def test_lfw_crops_faces_are_found_and_non_faces_are_not(detector):
    """scikit-image's lfw_subset: 100 25x25 face crops from Labeled Faces in the Wild, then 100
    crops of other images; each is enlarged 4x onto a grey margin (the cascade needs a face larger
    than its 24-pixel window, with some context)."""
    crops = np.load(os.path.join(SKIMAGE, "lfw_subset.npy"))

    def found(crop) -> bool:
        face = Image.fromarray((crop * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (160, 160), 128)
        canvas.paste(face, (30, 30))
        return bool(detector.detect(canvas))

    hits = sum(found(c) for c in crops[:100])
    false = sum(found(c) for c in crops[100:])
    assert hits >= 85 and false == 0  # measured: 92 of 100 and 0 of 100 with the defaults


def test_blur_changes_only_the_boxes_and_hides_the_face(detector):
    data = photo("astronaut.png")  # a PNG: re-encoded losslessly
    boxes = detector.detect_bytes(data)
    blurred, fmt = blur_faces(data, boxes)
    assert fmt == "PNG" and blur_faces(data, boxes)[0] == blurred  # the same bytes every time
    before = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    after = np.asarray(Image.open(io.BytesIO(blurred)).convert("RGB")).astype(int)
    inside = np.zeros(before.shape[:2], bool)
    for box in boxes:
        left, top, right, bottom = box_pixels(box, before.shape[1], before.shape[0])
        inside[top:bottom, left:right] = True
    assert np.array_equal(before[~inside], after[~inside])
    assert np.abs(before[inside] - after[inside]).mean() > 5
    assert detector.detect_bytes(blurred) == []
    # a JPEG stays a JPEG: outside the boxes only re-quantisation, inside the blur
    jpeg, fmt = blur_faces(grace_hopper(), detector.detect_bytes(grace_hopper()))
    assert fmt == "JPEG" and detector.detect_bytes(jpeg) == []


def test_options_that_need_face_detection_say_so(tmp_path):
    with pytest.raises(ConfigError, match="select.faces: requires face detection, set faces.enabled"):
        load_config(None, [f"input={tmp_path}/pool", f"output={tmp_path}/out", "select.faces=drop"])
    with pytest.raises(ConfigError, match="write.blur_faces: requires face detection, set faces.enabled"):
        load_config(None, [f"input={tmp_path}/pool", f"output={tmp_path}/out", "write.blur_faces=true"])


# -- whole runs -----------------------------------------------------------------------------------

CAPTION = b"a photograph taken outdoors on a sunny day"


@pytest.fixture(scope="module")
def face_pool(tmp_path_factory):
    """Two shards: real photographs (two with a face) among synthetic images, each with a json."""
    pool = tmp_path_factory.mktemp("face_pool")
    photos = [("astronaut", photo("astronaut.png"), "png"), ("coffee", photo("coffee.png"), "png"),
              ("hopper", grace_hopper(), "jpg"), ("rocket", photo("rocket.jpg"), "jpg"),
              ("chelsea", photo("chelsea.png"), "png")]
    synthetic = [(f"synthetic{i}", blocks_jpeg(i), "jpg") for i in range(5)]
    for shard, samples in enumerate([photos[:3] + synthetic[:2], photos[3:] + synthetic[2:]]):
        members = []
        for key, data, ext in samples:
            members += [(f"{key}.{ext}", data), (f"{key}.txt", CAPTION),
                        (f"{key}.json", json.dumps({"uid": uid_of(key), "key": key, "caption": CAPTION.decode()}).encode())]
        (pool / f"{shard:08d}.tar").write_bytes(make_tar(members))
    return pool


def uid_of(key: str) -> str:
    return hashlib.md5(key.encode()).hexdigest()


def blocks_jpeg(seed: int) -> bytes:
    """A JPEG of random colour blocks: no face, and no near duplicate of another seed's."""
    cells = np.random.default_rng(seed).integers(0, 256, (7, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(cells).resize((320, 280), Image.Resampling.NEAREST).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def shard_files(run_dir) -> dict[str, bytes]:
    files = {}
    for shard in sorted((run_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                files[member.name] = archive.extractfile(member).read()
    return files


@pytest.mark.usefixtures("ray_local")
def test_drop_removes_the_photographs_with_faces(face_pool, tmp_path):
    out = tmp_path / "drop"
    summary = run_pipeline(run_config(face_pool, out, faces={"enabled": True}, select={"faces": "drop"}))
    meta = read_metadata(out).to_pandas().set_index("key")
    assert sorted(meta.index[meta.drop_reason == "has_faces"]) == ["astronaut", "hopper"]
    assert meta.loc["astronaut", "drop_detail"] == "1 face(s) found"
    assert (meta.face_count > 0).sum() == 2 and meta.face_count.notna().all()
    assert len(meta.loc["hopper", "face_bboxes"]) == 1 and len(meta.loc["coffee", "face_bboxes"]) == 0
    assert summary.samples == 10 and summary.kept == 8  # the invariant check passed
    report = (out / "report.html").read_text()
    assert 'id="faces"' in report and "2 images with a face" in report and "2 dropped (has_faces)" in report


@pytest.mark.usefixtures("ray_local")
def test_blur_reencodes_only_images_with_a_face(face_pool, tmp_path):
    out = tmp_path / "blur"
    config = run_config(face_pool, out, faces={"enabled": True}, write={"blur_faces": True})
    summary = run_pipeline(config)
    assert summary.kept == 10
    meta = read_metadata(out).to_pandas().set_index("key")
    files = shard_files(out)
    detector = FaceDetector.from_config(FacesConfig())
    for key, row in meta.iterrows():
        image = next(data for name, data in files.items() if name.startswith(row.uid + ".") and not name.endswith((".txt", ".json")))
        published = json.loads(files[f"{row.uid}.json"])
        if key in ("astronaut", "hopper"):
            assert row.faces_blurred and hashlib.sha256(image).hexdigest() == row.blurred_sha256 != row.sha256
            assert published["faces_blurred"] is True and published["sha256"] == row.blurred_sha256
            assert published["original_sha256"] == row.sha256 and published["key"] == key
            assert published["face_bboxes"] == [list(b) for b in row.face_bboxes]
            assert detector.detect_bytes(image) == []
        else:
            assert not row.faces_blurred and row.blurred_sha256 is None
            assert hashlib.sha256(image).hexdigest() == row.sha256  # byte-identical
            assert "faces_blurred" not in published
    assert any(name.endswith(".png") for name in files if name.startswith(meta.loc["astronaut", "uid"]))
    report = (out / "report.html").read_text()
    assert "2 published blurred (write.blur_faces)" in report
    again = tmp_path / "again"
    run_pipeline(run_config(face_pool, again, faces={"enabled": True}, write={"blur_faces": True}))
    assert shard_files(again) == files  # same input and config: the same bytes


@pytest.mark.usefixtures("ray_local")
def test_datacomp_face_bboxes_are_taken_instead_of_detecting(face_pool, tmp_path):
    """DataComp metadata ships face_bboxes: with faces.source provided they are what the run uses
    (here a box on coffee.png and none on hopper, unlike the detector), and what it blurs."""
    import pyarrow as pa

    from pipeline.io.datacomp import write_metadata

    keys = ["astronaut", "coffee", "hopper", "rocket", "chelsea"] + [f"synthetic{i}" for i in range(5)]
    given = {"astronaut": [[0.35, 0.13, 0.53, 0.32]], "coffee": [[0.1, 0.1, 0.3, 0.3]]}
    vectors = np.random.default_rng(0).normal(size=(len(keys), 2, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    table = pa.table({"uid": [uid_of(k) for k in keys], "clip_l14_similarity_score": np.full(len(keys), 0.3, np.float32),
                      "face_bboxes": pa.array([given.get(k, []) for k in keys], pa.list_(pa.list_(pa.float64())))})
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    write_metadata(str(metadata / "part0.parquet"), table, {"l14_img": vectors[:, 0], "l14_txt": vectors[:, 1]})
    out = tmp_path / "provided"
    run_pipeline(run_config(face_pool, out, embed={"provided": {"metadata": str(metadata)}},
                            faces={"enabled": True, "source": "provided"}, write={"blur_faces": True}))
    meta = read_metadata(out).to_pandas().set_index("key")
    assert {k: [list(b) for b in meta.loc[k, "face_bboxes"]] for k in keys if meta.loc[k, "face_count"]} == given
    assert sorted(meta.index[meta.faces_blurred.fillna(False).astype(bool)]) == ["astronaut", "coffee"]
    files = shard_files(out)
    coffee = next(data for name, data in files.items() if name.startswith(uid_of("coffee") + ".") and name.endswith(".png"))
    assert hashlib.sha256(coffee).hexdigest() == meta.loc["coffee", "blurred_sha256"]
    hopper = next(data for name, data in files.items() if name.startswith(uid_of("hopper") + ".jpg"))
    assert hashlib.sha256(hopper).hexdigest() == meta.loc["hopper", "sha256"]  # no box given: untouched

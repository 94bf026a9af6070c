"""jobs/datacomp_dfn.yaml, the recipe the scheduled runs of infra/kuberay run: it validates, holds the
papers' settings, and on a machine without its weights fails before Ray starts with the one line that
names both models and the ways to provide them. Its weights cannot be had here, so it is not run end
to end; tests/test_incremental.py runs the incremental mechanics on model-free configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "datacomp_dfn.yaml"


def test_the_production_job_validates_with_the_papers_settings():
    config = load_config(str(JOB))
    # public open_clip weights, named as open_clip's pretrained registry names them
    assert (config.embed.model, config.embed.pretrained) == ("ViT-L-14", "openai")
    assert (config.dfn.model, config.dfn.pretrained) == ("ViT-H-14-quickgelu", "dfn5b")
    # DataComp's basic filter
    basic = config.basic_filter
    assert basic.enabled and basic.languages == ["en"]
    assert (basic.min_caption_words, basic.min_caption_chars, basic.min_image_side, basic.max_aspect_ratio) == (3, 6, 200, 3.0)
    # SemDeDup's clusters and eps
    assert (config.cluster.samples_per_cluster, config.cluster.niter) == (9000, 100)
    assert config.dedup.exact and config.dedup.phash and config.dedup.semantic
    assert config.dedup.semantic_eps == 0.07
    # the DFN paper's keep fraction, a pool-wide cut; no CLIP-score cut
    assert config.select.dfn.fraction == 0.15 and config.select.dfn.threshold is None
    assert not config.select.clip.enabled
    # DBP as on DataComp medium, with the authors' code defaults
    dbp = config.select.dbp
    assert dbp.enabled and (dbp.k, dbp.temperature, dbp.n_neighbors, dbp.balance_ratio) == (100, 0.5, 20, 0.5)
    assert config.reference is None  # the schedule passes reference=latest:...


def test_the_production_job_is_not_the_demo():
    demo = load_config(str(ROOT / "jobs" / "quickstart.yaml"))
    config = load_config(str(JOB))
    assert "curate-" not in f"{config.embed.model}{config.dfn.model}"  # not the project's toy model
    assert config.dedup.semantic_eps != demo.dedup.semantic_eps and config.select.dbp.k != demo.select.dbp.k


def test_without_its_weights_the_production_job_names_both_models_and_how_to_provide_them(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "00000000.tar").write_bytes(b"")  # discovery passes; the weights check comes last
    env = {k: v for k, v in os.environ.items() if k not in ("CURATE_DEBUG", "RAY_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(JOB),
         f"input={tmp_path / 'pool'}", f"output={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("curate: embed model ViT-L-14 / openai: weights unavailable"), line
    assert "dfn model ViT-H-14-quickgelu / dfn5b: weights unavailable" in line
    assert "HF_HUB_OFFLINE" in line and "embed.pretrained" in line and "dfn.pretrained" in line
    assert not (tmp_path / "out").exists()  # nothing ran

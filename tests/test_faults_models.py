"""Crash safety of the model stages: the quickstart job with its model, its driver killed with SIGKILL
while embed, cluster, dedup's SemDeDup step, or select's model-score cut or DBP runs.

The same command run again must resume the interrupted stage and give byte-identical output
(metadata, shards with their embeddings, embeddings/ and clusters/), every sample accounted for once.
The job without its model: tests/test_faults.py.
"""

from pathlib import Path

import pytest

from pipeline.runner import run_pipeline
from tests.helpers import (
    assert_same_output, faults_pool, kill_driver_when, partly_done, quickstart_config, resume_lines, run_job, stage_record,
)

# 24 input partitions of 50 samples: every stage's per-partition work outlasts the manifest's 2 s
# save throttle, so that its progress is recorded before it ends. The shards carry the embeddings
# (write reads embed too) and a fraction cut adds a global score boundary to the quickstart's
# threshold cut (dfn_score) and DBP.
OVERRIDES = ["write.shard_size=50", "write.embeddings=true", "select.clip.fraction=0.9"]

# Where work shows on disk before the manifest records it: the cluster stage's trained centroids,
# and in a global step (whose decision is recorded only once made) the updates its decision writes,
# its verdicts, DBP's per-partition assignments.
PROGRESS_FILES = {
    ("cluster", None): ["clusters/dedup_centroids.npy"],
    ("dedup", "semantic"): ["stages/dedup/semantic/updates/part-*.parquet"],
    ("select", "clip_score"): ["stages/select/clip_score/part-*.parquet"],
    ("select", "dbp"): ["stages/select_dbp/part-*.parquet", "stages/select/dbp/updates/part-*.parquet"],
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return faults_pool(tmp_path_factory, "faults-models", shard_size=50)


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory, ray_local):
    """The uninterrupted run, on this session's Ray (the output does not depend on the cluster)."""
    out = tmp_path_factory.mktemp("faults-models") / "reference"
    config = quickstart_config(pool, out, OVERRIDES)
    assert config.embed.model and config.dfn.model and config.dedup.semantic and config.select.dbp.enabled
    run_pipeline(config)
    stages = stage_record(out, "select")["counts"]["steps"]
    assert list(stages) == ["clip_score", "dfn_score", "dbp"]
    assert "semantic" in stage_record(out, "dedup")["counts"]["steps"]
    return out


def _in_progress(out: Path, stage: str, step: str | None) -> bool:
    """The stage is running and part of its work is done: partitions recorded in the manifest, or
    the step's decision recorded, or its files (PROGRESS_FILES) on disk."""
    record = stage_record(out, stage)
    if not record or record["complete"]:
        return False
    on_disk = any(next(out.glob(pattern), None) is not None for pattern in PROGRESS_FILES.get((stage, step), []))
    if step is None:
        return partly_done(record) or on_disk
    state = record["counts"].get("steps", {}).get(step, {})
    return "params" in state or bool(state.get("trained")) or on_disk


@pytest.mark.slow
@pytest.mark.parametrize("stage, step", [("embed", None), ("cluster", None), ("dedup", "semantic"),
                                         ("select", "clip_score"), ("select", "dbp")],
                         ids=["embed", "cluster", "dedup.semantic", "select.clip_score", "select.dbp"])
def test_driver_killed_in_a_model_stage_then_rerun_gives_identical_output(pool, reference, tmp_path, stage, step):
    out = tmp_path / "out"
    where = stage if step is None else f"{stage}.{step}"
    kill_driver_when(pool, out, OVERRIDES, lambda: _in_progress(out, stage, step), f"{where} in progress")
    interrupted = stage_record(out, stage)
    assert not interrupted["complete"]
    result = run_job(pool, out, OVERRIDES)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = resume_lines(result)
    log = "\n".join(lines)
    assert any(f"{stage}: resuming" in line for line in lines), log
    if step is None:
        done = len(interrupted["partitions_done"])
        assert f"{stage}: resuming, {done} partitions already done" in log
        assert done < len(stage_record(out, stage)["partitions_done"])  # the rest ran in the rerun
    for name, state in interrupted["counts"].get("steps", {}).items():
        if state.get("complete"):  # a step finished before the kill is not run again
            assert f"{stage}.{name}: finished before the interruption, kept" in log
    assert_same_output(reference, out)

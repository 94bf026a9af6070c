"""The stages' declarations: the plan, the reads a stage may make, and the config checks they give."""

import pytest

from pipeline.run import RunContext, RunPaths, UndeclaredReadError
from pipeline.runner import plan
from pipeline.stages import BY_NAME
from tests.helpers import run_config


def test_the_plan_and_each_stages_reads_follow_the_config(tmp_path):
    plain = {step.name: step.upstream for step in plan(run_config(tmp_path / "pool", tmp_path / "o"))}
    assert list(plain) == ["ingest", "dedup", "metadata", "write", "report"]
    assert plain["metadata"] == ("ingest", "dedup")
    full = run_config(tmp_path / "pool", tmp_path / "o", embed={"model": "curate-vit-tiny-64"}, dedup={"semantic": True},
                      select={"where": "width > 1"})
    reads = {step.name: step.upstream for step in plan(full)}
    assert reads["dedup"] == ("ingest", "embed", "cluster")
    assert reads["select"] == ("ingest", "embed", "cluster", "dedup")  # where reads the scores of what ran
    assert reads["metadata"] == ("ingest", "embed", "cluster", "dedup", "select")


def test_a_stage_may_read_only_what_it_declares(tmp_path):
    config = run_config(tmp_path / "pool", tmp_path / "o")
    reads = BY_NAME["dedup"].reads(config, {"ingest", "dedup"})
    ctx = RunContext(config, RunPaths(config.output), [], None, stage_name="dedup", reads=reads)
    assert ctx.read("ingest", 3).endswith("stages/ingest/part-000003.parquet")
    with pytest.raises(UndeclaredReadError, match="dedup reads embed's files but does not declare it"):
        ctx.read("embed", 3)


def test_an_option_needing_a_stage_that_is_off_names_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"dedup\.semantic, select\.clip: requires image embeddings"):
        run_config(tmp_path / "pool", tmp_path / "o", dedup={"semantic": True}, select={"clip": {"fraction": 0.5}})

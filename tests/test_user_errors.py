"""A user's mistake ends `curate` with one `curate: ...` line on stderr and exit code 2, no traceback.

Each case runs the real command in a child process. A run's checks of its config, input, reference,
select.where and weights come before Ray starts: stderr holding only the error line shows that
neither Ray's start nor any of the run's log lines (`HH:MM:SS curate INFO ray: ...`) happened.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def curate(*args: str, env: dict | None = None, entry: list[str] | None = None) -> subprocess.CompletedProcess:
    """`curate ARGS` (or `python pipeline/curate.py ARGS` with entry=...) in the repository, as a user runs it."""
    environment = {k: v for k, v in os.environ.items() if k not in ("CURATE_DEBUG", "RAY_ADDRESS")}
    environment.update(env or {})
    command = entry or [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*command, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one stderr line of a failed command (after checking that it is the only one)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("curate: ")
    assert result.returncode == code, result.stderr
    return lines[0]


@pytest.fixture
def job(tmp_path) -> str:
    """A job file that needs no model: only the checks under test can fail."""
    path = tmp_path / "job.yaml"
    path.write_text(f"input: {tmp_path / 'pool'}\noutput: {tmp_path / 'out'}\n")
    (tmp_path / "pool").mkdir()
    return str(path)


# -- config errors: where the key came from, and no Ray or torch for them ---------------------------------

def test_an_override_typo_is_named_with_a_suggestion_before_ray_or_torch_is_imported():
    result = curate("run", "--config", "jobs/quickstart.yaml", "select.clip.fractoin=0.3")
    assert error_line(result) == ("curate: override select.clip.fractoin=0.3: unknown key select.clip.fractoin; "
                                  "did you mean select.clip.fraction?")
    traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", "run", "--config",
                             "jobs/quickstart.yaml", "select.clip.fractoin=0.3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in traced.stderr.splitlines() if line.startswith("import time:")}
    assert "pipeline.config" in imported  # the trace does list the modules
    assert not {"ray", "torch", "open_clip", "pipeline.runner"} & imported


def test_a_typo_in_the_job_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("input: pool\noutput: out\nselect:\n  clip:\n    fractoin: 0.3\n")
    assert error_line(curate("run", "--config", str(path))) == (
        f"curate: {path}: unknown key select.clip.fractoin; did you mean select.clip.fraction?")


def test_an_unknown_section_gets_a_suggestion_too():
    line = error_line(curate("run", "--config", "jobs/quickstart.yaml", "selct.clip.fraction=0.3"))
    assert line.endswith("unknown key selct; did you mean select?")


def test_a_bad_value_names_the_override_and_the_value():
    line = error_line(curate("run", "--config", "jobs/quickstart.yaml", "embed.batch_size=lots"))
    assert line.startswith("curate: override embed.batch_size=lots: embed.batch_size: ")
    assert "'lots'" in line


def test_invalid_yaml_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("input: pool\noutput: [out\n")
    line = error_line(curate("run", "--config", str(path)))
    assert line.startswith(f"curate: {path}: not valid YAML: ") and "line 3" in line


def test_a_missing_job_file_is_named():
    assert error_line(curate("run", "--config", "jobs/no_such_job.yaml")) == (
        "curate: jobs/no_such_job.yaml: config file not found")


def test_overriding_one_score_filter_mode_replaces_the_other_from_the_file(tmp_path):
    # jobs/quickstart.yaml sets select.dfn.threshold
    config = load_config(str(ROOT / "jobs" / "quickstart.yaml"), ["select.dfn.fraction=0.3"])
    assert (config.select.dfn.threshold, config.select.dfn.fraction) == (None, 0.3)
    path = tmp_path / "fraction.yaml"
    path.write_text("input: pool\noutput: out\nembed: {model: ViT-B-32}\nselect: {clip: {fraction: 0.3}}\n")
    config = load_config(str(path), ["select.clip.threshold=0.25"])
    assert (config.select.clip.threshold, config.select.clip.fraction) == (0.25, None)
    # clearing one mode keeps the other; setting both is still an error, now naming the override
    config = load_config(str(path), ["select.clip.threshold=null"])
    assert (config.select.clip.threshold, config.select.clip.fraction) == (None, 0.3)
    with pytest.raises(ConfigError, match=r"^override select.clip.fraction=0.2: select.clip: set threshold or "
                                          r"fraction, not both$"):
        load_config(str(path), ["select.clip.threshold=0.25", "select.clip.fraction=0.2"])


def test_usage_errors_are_one_line_too():
    assert error_line(curate("run")) == (
        "curate: run: the following arguments are required: --config (see `curate run --help`)")


# -- checks before Ray: input, reference, select.where, storage, weights -----------------------------------

@pytest.mark.parametrize("make_input, problem", [
    (lambda tmp: tmp / "no_such_dir", "does not exist"),
    (lambda tmp: tmp / "pool", "matches no .tar, .tar.gz or .tgz shards"),  # a directory without any shard
])
def test_an_input_without_shards_is_named(job, tmp_path, make_input, problem):
    pool = make_input(tmp_path)
    (tmp_path / "pool" / "readme.txt").write_text("not a shard")
    line = error_line(curate("run", "--config", job, f"input={pool}"))
    assert line == f"curate: input '{pool}' {problem}"


def test_a_reference_that_is_not_a_run_is_named(job, tmp_path):
    not_a_run = tmp_path / "day0"
    not_a_run.mkdir()
    line = error_line(curate("run", "--config", job, f"reference={not_a_run}"))
    assert line == f"curate: reference {not_a_run} is not a finished run (no manifest.json)"


def test_a_select_where_that_does_not_bind_is_named_with_the_columns_it_could_mean(job):
    line = error_line(curate("run", "--config", job, "select.where=clip_scor > 0.3"))
    assert line.startswith("curate: select.where 'clip_scor > 0.3' is not a valid predicate over the metadata columns")
    assert '"clip_score"' in line  # DuckDB's candidate bindings survive the one-line form


def _closed_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def test_datacomp_job_on_s3_without_credentials_names_the_url_and_how_to_give_them(tmp_path):
    pytest.importorskip("s3fs")
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",  # botocore would otherwise ask the instance metadata service
        AWS_CONFIG_FILE=str(tmp_path / "no_config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no_credentials"),
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_loopback_port()}",
    )
    overrides = ["input=s3://BUCKET/datacomp-small/shards", "embed.provided.metadata=s3://BUCKET/datacomp-small/metadata",
                 "output=s3://BUCKET/runs/datacomp_small"]
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", "jobs/datacomp_metadata.yaml",
                             *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = error_line(result)
    assert line.startswith("curate: input s3://BUCKET/datacomp-small/shards: no access (NoCredentialsError: ")
    assert "AWS_ACCESS_KEY_ID" in line and "point input at local files" in line


def test_missing_weights_are_named_with_the_ways_to_provide_them(job, tmp_path):
    (tmp_path / "pool" / "00000000.tar").write_bytes(b"")  # discovery passes; the weights check comes last
    result = curate("run", "--config", job, "embed.model=ViT-B-32", "embed.pretrained=laion2b_s34b_b79k",
                    env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")})
    line = error_line(result)
    assert line.startswith("curate: embed model ViT-B-32 / laion2b_s34b_b79k: weights unavailable")
    assert "HF_HUB_OFFLINE" in line and "three ways" in line and "embed.pretrained" in line


# -- query and report ---------------------------------------------------------------------------------------

def test_query_and_report_on_a_directory_that_is_not_a_run_say_the_same_line(tmp_path):
    typo = tmp_path / "runs" / "quickstrat"
    typo.mkdir(parents=True)
    query = error_line(curate("query", str(typo), "select count(*) from samples"))
    report = error_line(curate("report", str(typo)))
    assert query == report == f"curate: {typo} is not a run (no manifest.json, no metadata/)"


# -- tracebacks on request, and the job entry point ----------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "flag after run", "env"])
def test_debug_adds_the_traceback_before_the_same_line(job, tmp_path, how):
    args = ["run", "--config", job, f"input={tmp_path / 'nope'}"]
    if how == "flag":
        result = curate("--debug", *args)
    elif how == "flag after run":
        result = curate(*args, "--debug")
    else:
        result = curate(*args, env={"CURATE_DEBUG": "1"})
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1] == f"curate: input '{tmp_path / 'nope'}' does not exist"


def test_the_job_entry_point_fails_the_same_way(job, tmp_path):
    script = [sys.executable, "pipeline/curate.py"]
    assert error_line(curate("--config", job, "write.shard_sise=5", entry=script)) == (
        "curate: override write.shard_sise=5: unknown key write.shard_sise; did you mean write.shard_size?")
    debug = curate("--debug", "--config", job, f"input={tmp_path / 'nope'}", entry=script)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


# -- help ----------------------------------------------------------------------------------------------------

def _subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return {"curate": parser, **{name: sub for name, sub in action.choices.items() if name != "synth"}}


@pytest.mark.parametrize("name", ["curate", "run", "query", "schema", "report", "train-dfn", "eval"])
def test_every_option_has_help_that_shows_its_default(name):
    parser = _subcommands()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.dest in ("help", "command"):
            continue
        assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest} has no help"
        if action.option_strings and not action.required:
            assert "default" in action.help, f"{name} {action.option_strings} does not say its default"
            if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" in action.help:
                assert f"default: {action.default}" in text


# -- Ray's start ----------------------------------------------------------------------------------------------

RAY_START_SCRIPT = textwrap.dedent("""
    import logging, sys
    import ray
    from pipeline import ray_adapter

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    failures = {failures!r}
    real_init = ray.init
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return real_init(**kwargs)

    ray.init = init
    try:
        started = ray_adapter.connect("local", 1)
        print("started", started, ray.is_initialized())
    except Exception as exc:
        print("raised", type(exc).__name__)
    finally:
        print("attempts", len(calls))
        ray.shutdown()
""")


def _connect_with(failures: str) -> subprocess.CompletedProcess:
    """ray_adapter.connect in a fresh process whose ray.init first raises `failures` (Python source of a list)."""
    script = RAY_START_SCRIPT.replace("{failures!r}", failures)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


TIMED_OUT = 'Exception("The current node timed out during startup. This could happen because some of the raylet ' \
            'failed to startup or the GCS has become overloaded.")'


def test_a_ray_start_that_times_out_is_retried_once_with_a_log_line():
    result = _connect_with(f"[{TIMED_OUT}]")
    assert result.stdout.split() == ["started", "True", "True", "attempts", "2"], result.stderr
    assert "ray: did not start (The current node timed out during startup." in result.stderr
    assert "retrying once" in result.stderr


def test_a_second_timeout_or_a_wrong_argument_is_not_retried_again():
    twice = _connect_with(f"[{TIMED_OUT}, {TIMED_OUT}]")
    assert twice.stdout.split() == ["raised", "Exception", "attempts", "2"], twice.stderr
    wrong = _connect_with('[ValueError("unknown argument")]')
    assert wrong.stdout.split() == ["raised", "ValueError", "attempts", "1"], wrong.stderr
    assert "retrying" not in wrong.stderr

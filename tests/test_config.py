import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, apply_overrides, config_json_schema, load_config
from pipeline.schema import metadata_schema_json
from tests.helpers import jpeg_bytes, make_tar

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_overrides_are_yaml_scalars_on_dotted_keys(tmp_path):
    config = load_config(write(tmp_path, "input: pool\noutput: out\n"),
                         ["output=/tmp/r2", "write.shard_size=256", "basic_filter.enabled=false",
                          "basic_filter.languages=[en, de]", "ray.address=null"])
    assert config.output == "/tmp/r2"
    assert config.write.shard_size == 256
    assert config.basic_filter.enabled is False
    assert config.basic_filter.languages == ["en", "de"]
    assert config.ray.address is None


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["no_such_key.really=1"], "no_such_key"),
        (["write.shard_sise=5"], "write.shard_sise"),
        (["write.shard_size=abc"], "write.shard_size"),
        (["write.shard_size=0"], "write.shard_size"),
        (["basic_filter.max_aspect_ratio=-1"], "basic_filter.max_aspect_ratio"),
        (["write=3"], "write"),
    ],
)
def test_bad_keys_and_values_are_rejected_naming_the_key(tmp_path, overrides, named):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "input: pool\noutput: out\n"), overrides)
    assert named in str(info.value)


def test_unknown_key_in_the_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.yaml: unknown key ingest\.max_pixels"):
        load_config(write(tmp_path, "input: p\noutput: o\ningest:\n  max_pixels: 5\n"))


def test_missing_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="input: required"):
        load_config(write(tmp_path, "output: o\n"))


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"output": "x"}, ["output.sub=1"])


def test_output_must_differ_from_input(tmp_path):
    with pytest.raises(ConfigError, match="overlap"):
        load_config(write(tmp_path, "input: pool/\noutput: pool\n"))


def _refusal(input_url, output_url) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"input={input_url}", f"output={output_url}"])
    message = str(info.value)
    assert "\n" not in message
    assert f"output {output_url}" in message and f"input {input_url}" in message
    return message


def test_output_spelt_differently_from_the_same_pool_is_refused(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    assert "the same location" in _refusal(pool, f"{pool}/../pool")


def test_input_inside_output_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    assert "input inside output" in _refusal(run / "shards", run)


def test_output_inside_input_is_refused(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    assert "output inside input" in _refusal(pool, pool / "run")
    assert "output inside input" in _refusal(f"{pool}/*.tar", pool / "run")


def test_output_through_a_symlink_to_the_pool_is_refused(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    (tmp_path / "alias").symlink_to(pool, target_is_directory=True)
    assert "the same location" in _refusal(pool, tmp_path / "alias")
    assert "output inside input" in _refusal(pool, tmp_path / "alias" / "run")


def test_unrelated_input_and_output_are_allowed(tmp_path):
    (tmp_path / "pool").mkdir()
    config = load_config(None, [f"input={tmp_path / 'pool'}", f"output={tmp_path / 'pool-run'}"])
    assert config.output == str(tmp_path / "pool-run")
    load_config(None, ["input=s3://b/pool", "output=s3://b/runs/r1"])


def test_url_output_inside_url_input_is_refused():
    assert "output inside input" in _refusal("s3://b/pool", "s3://b/pool/run")
    assert "output inside input" in _refusal("s3://b/pool/", "s3://b//pool/./run/")


def test_run_into_its_own_pool_deletes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    shard = run / "shards" / "00000000.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(make_tar([("a.jpg", jpeg_bytes()), ("a.txt", b"a red square on white")]))
    before = shard.read_bytes()
    job = write(tmp_path, "input: pool\noutput: out\n")
    assert main(["run", "--config", job, f"input={run / 'shards'}", f"output={run}"]) == 2
    assert "input inside output" in capsys.readouterr().err
    assert shard.read_bytes() == before


def test_every_job_file_is_valid():
    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        load_config(str(job))


def test_checked_in_schemas_match_the_code():
    assert json.loads((ROOT / "schemas" / "config.schema.json").read_text()) == config_json_schema()
    assert (ROOT / "schemas" / "metadata.schema.json").read_text() == metadata_schema_json()


def test_config_schema_validates_job_files():
    import jsonschema
    import yaml

    schema = config_json_schema()
    for job in (ROOT / "jobs").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(job.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"input": "a", "output": "b", "bogus": 1}, schema)

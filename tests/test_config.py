import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, apply_overrides, config_json_schema, load_config
from pipeline.schema import metadata_schema_json

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
    with pytest.raises(ConfigError, match="output must differ"):
        load_config(write(tmp_path, "input: pool/\noutput: pool\n"))


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

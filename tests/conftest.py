import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session: the pipeline attaches to it instead of starting its own."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_pool(tmp_path_factory):
    """A 600-sample synthetic pool in 4 shards, with its ground truth."""
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp("pool")
    synthesize(str(out), samples=600, seed=7, shard_size=150)
    return out



@pytest.fixture
def umask_022():
    """The process umask set to 022 for one test (the usual one), then restored."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)

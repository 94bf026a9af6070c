"""The output lease: one run per output; a stale lease is taken over, a lost one stops the run."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.io.lease import LEASE_NAME, LeaseLostError, OutputInUseError, OutputLease, hold_output


def _write_lease(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    held = {"run_id": "f" * 32, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time(),
            "stale_after_s": 120.0, **fields}
    (out / LEASE_NAME).write_text(json.dumps(held))
    return held


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lease_is_held_for_the_block_and_removed_after(tmp_path):
    out = tmp_path / "out"
    with hold_output(str(out), 60) as lease:
        held = json.loads((out / LEASE_NAME).read_text())
        assert held["run_id"] == lease.run_id and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        oct_mode = (out / LEASE_NAME).stat().st_mode & 0o777
        assert oct_mode == 0o644
    assert not (out / LEASE_NAME).exists()


def test_a_fresh_lease_of_another_run_refuses_the_second(tmp_path):
    out = tmp_path / "out"
    held = _write_lease(out)  # this very process is alive: the lease is fresh
    with pytest.raises(OutputInUseError, match=f"output {out} is in use by run {held['run_id']} on host "):
        with hold_output(str(out), 60):
            pytest.fail("the second run must not start")
    assert json.loads((out / LEASE_NAME).read_text()) == held  # left alone


@pytest.mark.parametrize("why", ["dead process", "not renewed", "cut short"])
def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, caplog, why):
    out = tmp_path / "out"
    if why == "dead process":
        _write_lease(out, pid=_dead_pid())
        expected = "on this host is gone"
    elif why == "not renewed":
        _write_lease(out, host="another-host", renewed=time.time() - 500, stale_after_s=60)
        expected = "over the 60 s after which a lease is stale"
    else:
        out.mkdir()
        (out / LEASE_NAME).write_text('{"run_id": "ab')
        expected = "it holds no run id"
    with caplog.at_level(logging.WARNING, logger="curate"), hold_output(str(out), 60) as lease:
        assert json.loads((out / LEASE_NAME).read_text())["run_id"] == lease.run_id
    assert "taking over the lease of run" in caplog.text and expected in caplog.text
    assert not (out / LEASE_NAME).exists()


def test_a_run_whose_lease_was_taken_over_stops_and_leaves_the_new_lease(tmp_path):
    out = tmp_path / "out"
    with hold_output(str(out), 60) as lease:
        thief = _write_lease(out, run_id="e" * 32, host="another-host")
        lease.renew()
        with pytest.raises(LeaseLostError, match=f"another run took over its lease: run {'e' * 32} on host another-host"):
            lease.check()
    assert json.loads((out / LEASE_NAME).read_text()) == thief  # not removed: it is the other run's


def test_on_an_object_store_the_lease_is_written_and_read_back(tmp_path):
    import fsspec

    out = f"memory://curate-lease-test-{os.getpid()}/out"
    memory = fsspec.filesystem("memory")
    with hold_output(out, 60) as lease:
        assert json.loads(memory.cat(f"{out}/{LEASE_NAME}"))["run_id"] == lease.run_id
        with pytest.raises(OutputInUseError):
            OutputLease(out, 60).acquire()
    assert not memory.exists(f"{out}/{LEASE_NAME}")


def test_renewal_rewrites_the_time(tmp_path):
    out = tmp_path / "out"
    with hold_output(str(out), 60) as lease:
        first = json.loads((out / LEASE_NAME).read_text())["renewed"]
        time.sleep(0.05)
        lease.renew()
        assert json.loads((out / LEASE_NAME).read_text())["renewed"] > first
        lease.check()


def test_a_run_into_an_output_another_run_holds_fails_before_touching_it(tmp_path):
    from pipeline.config import UserError
    from pipeline.runner import run_pipeline
    from tests.helpers import jpeg_bytes, make_tar, run_config

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "00000000.tar").write_bytes(make_tar([("a.jpg", jpeg_bytes()), ("a.txt", b"a caption of some words")]))
    out = tmp_path / "out"
    held = _write_lease(out)
    (out / "stages").mkdir()
    (out / "stages" / "marker").write_text("the other run's file")
    with pytest.raises(UserError, match="is in use by run"):
        run_pipeline(run_config(pool, out))
    assert (out / "stages" / "marker").exists() and json.loads((out / LEASE_NAME).read_text()) == held

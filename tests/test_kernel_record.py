"""The record of passed kernel self-checks: a later process skips a check passed under the same key (kernel code,
MLX build, device), and runs it again under another key, after a failure, or when told to."""

import json

import pytest

from specdec.models import kernels


@pytest.fixture
def fake_check(monkeypatch, tmp_path):
    """A registered check that counts its runs, on a pretend CUDA device, with the record in tmp_path."""
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPECDEC_KERNEL_CHECKS", raising=False)
    monkeypatch.delenv("SPECDEC_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "on_cuda", lambda: True)
    runs = {"count": 0, "result": True}

    def check():
        runs["count"] += 1
        return runs["result"]

    monkeypatch.setitem(kernels._checks, "fake", check)
    yield runs
    kernels._passed.pop("fake", None)


def new_process():
    kernels._passed.pop("fake", None)


def test_a_passed_check_is_recorded_and_not_run_again(fake_check, tmp_path):
    assert kernels.ready("fake") and fake_check["count"] == 1
    record = json.loads((tmp_path / "kernel-checks.json").read_text())
    assert record == {"key": kernels.record_key(), "passed": ["fake"]}
    new_process()
    assert kernels.ready("fake") and fake_check["count"] == 1


def test_another_key_or_always_runs_the_check_again(fake_check, monkeypatch):
    kernels.ready("fake")
    new_process()
    monkeypatch.setenv("SPECDEC_KERNEL_CHECKS", "always")
    assert kernels.ready("fake") and fake_check["count"] == 2
    monkeypatch.delenv("SPECDEC_KERNEL_CHECKS")
    new_process()
    monkeypatch.setattr(kernels, "record_key", lambda: "other code, build or device")
    assert kernels.ready("fake") and fake_check["count"] == 3


def test_a_failed_check_is_not_recorded(fake_check, tmp_path):
    fake_check["result"] = False
    with pytest.warns(UserWarning, match="failed its self-check"):
        assert not kernels.ready("fake")
    assert not (tmp_path / "kernel-checks.json").exists()
    new_process()
    fake_check["result"] = True
    assert kernels.ready("fake") and fake_check["count"] == 2


def test_an_unreadable_record_means_checking_again(fake_check, tmp_path):
    (tmp_path / "kernel-checks.json").write_text("{not json")
    assert kernels.ready("fake") and fake_check["count"] == 1
    assert json.loads((tmp_path / "kernel-checks.json").read_text())["passed"] == ["fake"]


def test_an_unwritable_record_warns_and_the_kernel_still_runs(fake_check, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(blocker / "below a file"))
    with pytest.warns(UserWarning, match="could not record"):
        assert kernels.ready("fake")


def test_the_key_covers_this_build():
    key = kernels.record_key()
    assert len(key) == 64 and int(key, 16) >= 0

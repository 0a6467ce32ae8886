"""dsmi's PyTorch commands re-execute once under a caching allocator when one is installed."""

import sys

from dsmi_cli import allocator
from dsmi_cli.allocator import ensure_caching_allocator


def test_reexecutes_with_the_library_preloaded(monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "_LIBRARY_DIRS", (str(tmp_path),))
    calls = []
    got = ensure_caching_allocator("train", ["train", "--out", "x"], environ={"A": "1"},
                                   execute=lambda *a: calls.append(a))
    assert got == "tcmalloc"
    (exe, argv, env), = calls
    assert exe == sys.executable and argv[1:] == ["-m", "dsmi_cli", "train", "--out", "x"]
    assert env["LD_PRELOAD"] == str(lib) and env["A"] == "1"


def test_no_reexecution_when_preloaded_or_turned_off(monkeypatch, tmp_path):
    calls = []
    env = {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}
    assert ensure_caching_allocator("train", [], environ=env,
                                    execute=lambda *a: calls.append(a)) == "tcmalloc"
    assert ensure_caching_allocator("train", [], environ={"DSMI_ALLOCATOR": "system"},
                                    execute=lambda *a: calls.append(a)) == "system"
    assert calls == []


def test_a_missing_allocator_is_said_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(allocator, "_LIBRARY_DIRS", (str(tmp_path),))
    calls = []
    got = ensure_caching_allocator("train", [], environ={"DSMI_ALLOCATOR": "jemalloc"},
                                   execute=lambda *a: calls.append(a))
    assert got == "system" and calls == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jemalloc is not installed" in err[0] and "libjemalloc2" in err[0]

"""Atomic writes: whole files or none, and the permissions a plain open() would give."""

import os
import stat
import subprocess
import sys

import pytest

from medseg.core.errors import MedsegError
from medseg.core.files import atomic_path, remove_partial_files, write_text


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_the_umask_permissions_not_mkstemps(tmp_path):
    previous = os.umask(0o027)  # as if the process ran under umask 027
    try:
        write_text(tmp_path / "report.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "report.csv") == 0o640  # mkstemp alone gives 0o600


def test_importing_medseg_leaves_the_umask_alone():
    # Reading the umask means setting it; at import that briefly changed it for every thread.
    code = (
        "import os; calls = []; real = os.umask; "
        "os.umask = lambda mask: calls.append(mask) or real(mask); "
        "import medseg, medseg.core.files; assert not calls, calls"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("{}")
    path.chmod(0o644)
    write_text(path, '{"dice": 1}')
    assert mode(path) == 0o644
    assert path.read_text() == '{"dice": 1}'


def test_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"earlier")
    with (
        pytest.raises(MedsegError, match=f"cannot write {path}: No space left"),
        atomic_path(path) as temporary,
    ):
        temporary.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert path.read_bytes() == b"earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_remove_partial_files_takes_only_atomic_path_leftovers(tmp_path):
    leftovers = [".last.pt.k2j4h_x9.tmp.pt", ".metrics.csv.abcdefgh.tmp.csv"]
    kept = [".notes.tmp", ".a.abcdefgh.tmp.png", "last.pt", ".last.pt.short.tmp.pt"]
    for name in leftovers + kept:
        (tmp_path / name).write_text("x")
    removed = remove_partial_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)

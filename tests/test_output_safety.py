"""What the tools remove or replace is only ever what they wrote, and OS failures are one line naming the path:
mlsae-analyse's leftovers of killed runs, mlsae-lens train --out, and run_command's errno messages."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from models import assert_one_line_error

from mlsae_analysis.files import remove_stale_partials, write_fresh_directory
from mlsae_cache.clitools import os_error_message, run_command
from mlsae_cache.lens_cli import main as lens_main


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_analysis_leftover_is_removed_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "analysis"
    stale = tmp_path / f".analysis.partial-{dead_pid()}"  # what kill -9 leaves behind
    (stale / "latents").mkdir(parents=True)
    (stale / "latents" / "part-0.parquet").write_bytes(b"x")
    live = tmp_path / f".analysis.partial-{os.getppid()}"  # a running process's: maybe another analysis
    other_name = tmp_path / f".other.partial-{dead_pid()}"  # another --out's
    not_a_pid = tmp_path / ".analysis.partial-notes"
    a_file = tmp_path / f".analysis.partial-{dead_pid()}0"
    for keep in (live, other_name, not_a_pid):
        keep.mkdir()
        (keep / "mine.txt").write_text("keep")
    a_file.write_text("a file, not a folder")

    def fill(partial: Path) -> None:
        partial.mkdir()
        (partial / "summary.json").write_text("{}")

    write_fresh_directory(out, fill)
    assert not stale.exists()
    assert str(stale) in capsys.readouterr().err  # said, not silent
    assert (out / "summary.json").read_text() == "{}"
    for keep in (live, other_name, not_a_pid):
        assert (keep / "mine.txt").read_text() == "keep"
    assert a_file.read_text() == "a file, not a folder"
    assert remove_stale_partials(out) == []


def test_a_failed_analysis_leaves_neither_out_nor_its_partial(tmp_path):
    def fill(partial: Path) -> None:
        partial.mkdir()
        raise OSError(errno.ENOSPC, "No space left on device", str(partial / ".metrics.csv.abcd.tmp"))

    out = tmp_path / "analysis"
    with pytest.raises(OSError) as caught:
        write_fresh_directory(out, fill)
    assert caught.value.filename == str(out / ".metrics.csv.abcd.tmp")  # named under --out, not its hidden sibling
    assert os_error_message(caught.value).startswith(f"disk full while writing {out / 'metrics.csv'} ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error, code, fragments",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/out/.shard-000001.h5.k2j3.tmp"), 28,
         ["disk full while writing /x/out/shard-000001.h5", "free space", "the same command"]),
        (OSError("No space left on device (os error 28)"), 28, ["disk full while writing the output"]),  # polars
        (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 2, ["cannot write to /ro/out: permission denied", "--out"]),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), 2, ["cannot write to /mnt/ro/out: read-only file system"]),
    ],
)
def test_os_errors_are_one_line_with_the_path_and_the_fix(error, code, fragments, capsys):
    def failing(argv):
        raise error

    assert run_command(failing, []) == code
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_other_os_errors_are_not_hidden():
    def failing(argv):
        raise OSError(errno.EIO, "Input/output error", "/x")

    with pytest.raises(OSError):  # a bug or a broken disk: the traceback is the useful report
        run_command(failing, [])


def test_lens_out_that_is_a_file_or_holds_other_files_is_refused(tmp_path, capsys):
    base = ["train", "--model", str(tmp_path / "no-model"), "--dataset", str(tmp_path), "--no-progress"]
    a_file = tmp_path / "lens.pt"
    a_file.write_bytes(b"keep")
    assert lens_main([*base, "--out", str(a_file)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(a_file), "is a file")
    assert a_file.read_bytes() == b"keep"
    model_dir = tmp_path / "a-model"  # holds a config.json: --overwrite must not take it for a lens's
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"weights")
    assert lens_main([*base, "--out", str(model_dir), "--overwrite"]) == 2
    assert_one_line_error(capsys.readouterr().err, "config.json, which is not a lens file")
    assert (model_dir / "config.json").read_text() == "{}" and (model_dir / "model.safetensors").read_bytes() == b"weights"
    (model_dir / "model.safetensors").unlink()  # a model's config.json alone: still not a lens's
    assert lens_main([*base, "--out", str(model_dir), "--overwrite"]) == 2
    assert_one_line_error(capsys.readouterr().err, "config.json", "not a lens file")
    assert (model_dir / "config.json").read_text() == "{}"


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path, monkeypatch):
    """Root may write anywhere, so the permission check is what a non-root user meets (os.access patched)."""
    from mlsae_cache.errors import MlsaeError

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path else real_access(path, mode, **kw))
    filled = []
    with pytest.raises(MlsaeError, match=f"cannot write to {tmp_path}: permission denied; choose a writable --out"):
        write_fresh_directory(tmp_path / "analysis", filled.append)
    assert filled == [] and list(tmp_path.iterdir()) == []

"""Fault injection for tests/test_faults.py: damaged files, failing writes, signals, and what a command did.

Every helper here injects one fault the way the world would, and nothing else:
- ``flip_byte`` / ``truncate``: a file damaged on disk (one bit, or cut in half);
- ``failing_writes``: a read-only or full file system under one folder, in this process (root ignores
  permission bits and no small file system can be made without privileges, so the failure is raised by
  the functions every writer of the pipeline goes through: mkstemp, mkdir, open, fsync, rename, unlink);
- ``Zygote.run`` + ``signal_at_random_point``: SIGINT or SIGKILL at a seeded random moment of a child
  process running a command's main() (forked from a process that has imported everything once);
- ``snapshot``: the sha256 of every file under some folders, to prove that nothing earlier changed.
"""

from __future__ import annotations

import builtins
import contextlib
import errno as errno_codes
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# What a command did


@dataclass
class Outcome:
    code: int | None
    """Exit status (None: the process was still running; negative: killed by that signal)."""
    stdout: str
    stderr: str
    """With the traceback of an exception that escaped main() appended, as the interpreter would print it."""

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    @property
    def has_traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    def describe(self) -> str:
        return f"exit {self.code}\n--- stderr ---\n{self.stderr[-4000:]}\n--- stdout ---\n{self.stdout[-2000:]}"


FRESH_PROCESS_TORCH_SEED = 67280421310721
"""The seed of torch's global generator in a fresh process. Checkpoints store that generator's state, so
every command starts from it here, as it would on its own (the tests before it have drawn from it)."""


def call_main(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys) -> Outcome:
    """Run a command's ``main(argv)`` in this process; an exception that escapes it counts as a traceback."""
    import torch

    torch.manual_seed(FRESH_PROCESS_TORCH_SEED)
    capsys.readouterr()
    escaped = ""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException:  # noqa: BLE001 - exactly what a user would see as a traceback
        code, escaped = 1, traceback.format_exc()
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err + escaped)


def assert_one_line_failure(outcome: Outcome, *fragments: str) -> str:
    """Non-zero exit, exactly one ``error:`` line (holding every fragment), no traceback."""
    assert not outcome.has_traceback, outcome.describe()
    assert outcome.code not in (0, None), outcome.describe()
    assert len(outcome.error_lines) == 1, outcome.describe()
    line = outcome.error_lines[0]
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in the error line\n{outcome.describe()}"
    return line


# ----------------------------------------------------------------------------------------------------
# Files: snapshots and damage


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_hex(path: Path, algorithm: str) -> str:
    """The hex digest of a file by a named algorithm (blake3 from its package, the rest from hashlib)."""
    data = Path(path).read_bytes()
    if algorithm == "blake3":
        import blake3

        return blake3.blake3(data).hexdigest()
    return hashlib.new(algorithm, data).hexdigest()


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under ``roots`` (hidden ones included)."""
    found = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for path in files:
            found[str(path)] = sha256_of(path)
    return found


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    """Every file of ``before`` still exists with the same bytes (files added since are not checked here)."""
    lost = sorted(set(before) - set(after))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not lost and not changed, f"lost: {lost[:5]}, changed: {changed[:5]}"


def flip_byte(path: Path, seed: int = 0) -> int:
    """Flip one bit of one byte in the middle half of ``path`` (a seeded choice); returns its offset."""
    data = bytearray(Path(path).read_bytes())
    rng = random.Random(f"{Path(path).name}-{seed}")
    offset = rng.randrange(len(data) // 4, max(len(data) * 3 // 4, len(data) // 4 + 1))
    data[offset] ^= 1 << rng.randrange(8)
    Path(path).write_bytes(bytes(data))
    return offset


def truncate(path: Path) -> None:
    """Cut ``path`` to half its length, as a copy or a write stopped half-way leaves it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


DAMAGES: dict[str, Callable[[Path], object]] = {"flipped": flip_byte, "truncated": truncate}


# ----------------------------------------------------------------------------------------------------
# A read-only or full file system under one folder


def _is_under(path, root: Path) -> bool:
    try:
        return Path(os.path.realpath(os.fspath(path))).is_relative_to(root)
    except TypeError:  # a file descriptor or an unusual path object: not ours to fail
        return False


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


@contextlib.contextmanager
def failing_writes(monkeypatch, root: Path, code: int, after: int = 0) -> Iterator[list[str]]:
    """Under ``root``, every file written after the first ``after`` fails with ``code``.

    ``errno.EACCES`` (a read-only folder): creating, renaming or removing anything fails at once.
    ``errno.ENOSPC`` (a full disk): the data of a new file is written, then its fsync fails (where a
    full device reports it); opening a file for writing fails too. Folders can still be made.
    Yields the list of paths whose write failed.
    """
    root = Path(os.path.realpath(root))
    failed: list[str] = []
    written: set[str] = set()  # the files allowed before the disk fills (one atomic write: one file)
    read_only = code != errno_codes.ENOSPC

    def fault(path) -> OSError:
        failed.append(str(path))
        return OSError(code, os.strerror(code), str(path))

    def counts_as_full(path) -> bool:
        if not _is_under(path, root):
            return False
        key = os.path.realpath(os.fspath(path))
        if key not in written and len(written) < after:
            written.add(key)
        return key not in written

    real_mkstemp, real_mkdir, real_open, real_io_open = tempfile.mkstemp, os.mkdir, builtins.open, io.open
    real_fsync, real_rename, real_replace, real_unlink, real_rmdir, real_rmtree = (
        os.fsync, os.rename, os.replace, os.unlink, os.rmdir, shutil.rmtree)  # fmt: skip
    real_os_open = os.open

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        target = Path(dir or tempfile.gettempdir()) / f"{prefix or ''}X{suffix or ''}"
        if read_only and _is_under(target, root):
            raise fault(target)
        return real_mkstemp(suffix, prefix, dir, text)

    def fsync(fd):
        path = _fd_path(fd)
        if not read_only and counts_as_full(path):
            raise fault(path)
        return real_fsync(fd)

    def mkdir(path, *args, **kwargs):
        if read_only and _is_under(path, root) and not os.path.isdir(path):
            raise fault(path)
        return real_mkdir(path, *args, **kwargs)

    def opener(real):
        def open_(file, mode="r", *args, **kwargs):
            if _writes(mode) and (read_only and _is_under(file, root) or not read_only and counts_as_full(file)):
                raise fault(file)
            return real(file, mode, *args, **kwargs)

        return open_

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and "dir_fd" not in kwargs:
            if read_only and _is_under(path, root):
                raise fault(path)
        return real_os_open(path, flags, *args, **kwargs)

    def two_paths(real):
        def move(src, dst, *args, **kwargs):
            if read_only and (_is_under(src, root) or _is_under(dst, root)):
                raise fault(dst)
            return real(src, dst, *args, **kwargs)

        return move

    def one_path(real):
        def remove(path, *args, **kwargs):
            if read_only and "dir_fd" not in kwargs and _is_under(path, root):
                raise fault(path)
            return real(path, *args, **kwargs)

        return remove

    def rmtree(path, *args, **kwargs):
        if read_only and _is_under(path, root) and os.path.exists(path):
            if kwargs.get("ignore_errors") or (len(args) > 0 and args[0]):
                failed.append(str(path))
                return None
            raise fault(path)
        return real_rmtree(path, *args, **kwargs)

    patches = {
        (tempfile, "mkstemp"): mkstemp, (os, "fsync"): fsync, (os, "mkdir"): mkdir, (os, "open"): os_open,
        (builtins, "open"): opener(real_open), (io, "open"): opener(real_io_open),
        (os, "rename"): two_paths(real_rename), (os, "replace"): two_paths(real_replace),
        (os, "unlink"): one_path(real_unlink), (os, "remove"): one_path(real_unlink), (os, "rmdir"): one_path(real_rmdir),
        (shutil, "rmtree"): rmtree,
    }  # fmt: skip
    with monkeypatch.context() as patch:
        for (module, name), replacement in patches.items():
            patch.setattr(module, name, replacement)
        yield failed


# ----------------------------------------------------------------------------------------------------
# Signals at random points of a subprocess


ZYGOTE = r"""
import importlib, importlib.util, json, os, signal, sys, traceback

def load(target):
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location("zygote_" + os.path.basename(target)[:-3], target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module.main
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)

mains = {target: load(target) for target in json.loads(sys.argv[1])}
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)  # what each command imports once its arguments parse
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(os.devnull, os.O_RDONLY)
                os.dup2(fd, 0)
                for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                import torch
                torch.manual_seed(request["torch_seed"])  # where a fresh process's generator starts
                code = mains[request["target"]](request["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush(); sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        reply = {"pid": pid}
    else:
        pid, status = os.waitpid(request["pid"], os.WNOHANG)
        reply = {"code": os.waitstatus_to_exitcode(status) if pid else None}
    print(json.dumps(reply), flush=True)
"""


class Zygote:
    """A Python process that imports the commands once, then forks one child per command run: each child is
    a fresh process for all that matters (no thread pool started, torch's generator unseeded) without a
    second of imports. Forking pytest itself would not do: polars' and OpenMP's thread pools do not
    survive a fork once they have run."""

    def __init__(self, targets: Sequence[str], preload: Sequence[str]) -> None:
        import json

        self._json = json
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, json.dumps(list(targets)), json.dumps(list(preload))],
                                     cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip

    def _ask(self, **request) -> dict:
        self.proc.stdin.write(self._json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote process died; its imports failed (run one of the commands by hand)")
        return self._json.loads(line)

    def run(self, target: str, argv: Sequence[str], log_dir: Path) -> tuple["Child", Path, Path]:
        log_dir.mkdir(parents=True, exist_ok=True)
        out, err = log_dir / "stdout.txt", log_dir / "stderr.txt"
        request = {"target": target, "argv": [str(a) for a in argv], "stdout": str(out), "stderr": str(err)}
        pid = self._ask(op="run", torch_seed=FRESH_PROCESS_TORCH_SEED, **request)["pid"]
        return Child(self, pid), out, err

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Child:
    """A command forked by the zygote; the Popen-like calls the tests need."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote._ask(op="wait", pid=self.pid)["code"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        return self.returncode


def signal_at_random_point(
    proc: Child, started: Callable[[], bool], sig: int, seed: str, window_s: float, timeout_s: float = 120
) -> float:
    """Once ``started()`` holds (the command began writing), wait a seeded random part of ``window_s``,
    then send ``sig`` (unless the process has already exited). Returns the delay chosen."""
    deadline = time.monotonic() + timeout_s
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    delay = random.Random(seed).uniform(0, window_s)
    end = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(sig)
    return delay


def finish(proc: Child, out: Path, err: Path, timeout_s: float = 120) -> Outcome:
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # a command that hangs on a signal: kill it, and say so
        proc.kill()
        proc.wait(timeout_s)
        hung = f"\n[hung: no exit {timeout_s:.0f}s after the signal]"
        return Outcome(None, out.read_text(errors="replace"), err.read_text(errors="replace") + hung)
    return Outcome(code, out.read_text(errors="replace"), err.read_text(errors="replace"))

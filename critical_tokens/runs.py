"""A run is a directory that describes itself: ``config.json``, ``metrics.jsonl``, ``model/``.

Everything here writes atomically (write to a temporary sibling, then ``os.replace``) so that a
crash never leaves a half-written file or checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent  # the installed package: nothing is ever written inside it
PROCESS = "process.json"  # in a run directory: the host and process id that write it (a run's state marker)
CHECKPOINT = Path("model") / "trainer_state.pt"  # in a run directory: the last checkpoint, what --resume continues


class UserError(Exception):
    """A problem with the user's input: the command line prints it as one line and exits 2."""


# OS errors that are the user's to fix (a full disk, a read-only or forbidden place, a file where a
# directory is needed): the command line prints them as one line. Any other exception is a bug.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                  errno.ENAMETOOLONG, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def normal_modes(path: str | Path) -> None:
    """Gives ``path`` (and, for a directory, everything in it) the modes of a file made with
    ``open``: 0666 (directories 0777) less the umask. ``mkstemp``, ``mkdtemp`` and the temporary
    files of libraries such as safetensors are 0600 / 0700, which a rename would keep, and a run
    or a report could not be shared on a multi-user machine."""
    path, mask = Path(path), _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        normal_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_text(path: str | Path) -> str:
    """A file the user gives or a run wrote, as UTF-8 text; a UserError when it is not text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a file") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg}: line {e.lineno} column {e.colno}") from None


def atomic_dir(final: str | Path):
    """Context manager: yields a temporary directory that replaces ``final`` on success."""

    class _AtomicDir:
        def __enter__(self) -> Path:
            self.final = Path(final)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}."))
            return self.tmp

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            normal_modes(self.tmp)
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if self.final.exists():
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)

    return _AtomicDir()


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed at each line).

    On resume, lines logged after the checkpoint's step are dropped so that a resumed run's file
    equals an uninterrupted one.
    """

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif truncate_after_step is None:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # cut short by a kill: it is past the last checkpoint, which is what resume keeps
                break
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {i + 1}: not a JSON object")
        records.append(record)
    return records


def save_config(run_dir: str | Path, config: Any, **derived: Any) -> dict[str, Any]:
    """Saves the command's frozen dataclass and the values derived from it, once, at start-up."""
    record = {"config": dataclasses.asdict(config), **derived}
    write_json(Path(run_dir) / PROCESS, {"host": socket.gethostname(), "pid": os.getpid()})  # who writes the run: see `stopped_before_checkpoint`
    write_json(Path(run_dir) / "config.json", record)
    return record


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    kind = run_kind(run_dir)
    if kind in (None, "model", "reproduction"):
        raise UserError(f"{run_dir} is {describe_kind(kind)}, not a critical-tokens run")
    return read_json(run_dir / "config.json")


def run_kind(directory: str | Path) -> str | None:
    """What a directory holds, from its own files: the ``kind`` of a run's ``config.json``
    ("pretrain", "rl"), "reproduction" (``reproduce.json``), "model" (a Hugging Face model's
    ``config.json``), or None (none of these). A ``config.json`` that is neither is a UserError."""
    directory = Path(directory)
    if (directory / "reproduce.json").is_file():
        return "reproduction"
    path = directory / "config.json"
    if not path.is_file():
        return None
    saved = read_json(path)
    if isinstance(saved, dict) and isinstance(saved.get("kind"), str) and isinstance(saved.get("config"), dict):
        return saved["kind"]
    if isinstance(saved, dict) and "model_type" in saved:
        return "model"
    raise UserError(f"{path} is neither a critical-tokens run's config nor a model's")


def describe_kind(kind: str | None) -> str:
    return {None: "a directory without config.json", "model": "a model directory", "reproduction": "a reproduction",
            "pretrain": "a pre-training run", "rl": "an RL run"}.get(kind, f"a {kind} run")


def start_or_resume(config):
    """The config a training command runs with. On ``--resume``: the run's saved config (with this
    invocation's device and directory), after checking that it is a run of the same command with a
    checkpoint to resume from. Otherwise: ``config`` itself, refusing to write into an existing
    non-empty directory. A run of this command that stopped before its first checkpoint, whatever
    stopped it (an error, SIGTERM, SIGKILL, a power cut), holds nothing to resume: it starts over,
    with or without ``--resume``."""
    run_dir = Path(config.out)
    if config.resume:
        record = load_run_config(run_dir)
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(record["config"]) - fields)
        if unknown:  # another command's run (or another version's): its config is not this command's
            raise UserError(f"cannot resume {run_dir}: it is {describe_kind(record['kind'])}, not a run of this command "
                            f"(its config.json has {', '.join(unknown[:3])})")
        saved = dataclasses.replace(type(config)(**record["config"]), resume=True, device=config.device, out=str(run_dir))
        if (run_dir / CHECKPOINT).exists():
            return saved
        if not stopped_before_checkpoint(run_dir, config):
            raise UserError(f"{run_dir} holds no checkpoint to resume from")
        start_over(run_dir)
        return dataclasses.replace(saved, resume=False)
    check_output(config.out, "--out", directory=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not stopped_before_checkpoint(run_dir, config):
            raise UserError(f"{run_dir} already exists; pass --resume to continue it or choose another --out")
        start_over(run_dir)
    return config


def stopped_before_checkpoint(run_dir: Path, config) -> bool:
    """Whether ``run_dir`` is what a run of ``config``'s command leaves when it stops before its first
    checkpoint: no checkpoint; its config.json one of this command (or none yet, and only the files
    written before it); and the process that wrote it (``process.json``) no longer running. Under
    torchrun (several ranks, each checking the directory) such a run is refused as before."""
    if (run_dir / CHECKPOINT).exists() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    if (run_dir / "config.json").is_file():
        saved = read_json(run_dir / "config.json")
        fields = {f.name for f in dataclasses.fields(config)}
        if run_kind(run_dir) not in ("pretrain", "rl") or not set(saved["config"]) <= fields:
            return False
    elif any(p.name != PROCESS and not p.name.startswith(".") for p in run_dir.iterdir()):  # only temporaries and the marker
        return False
    process = read_json(run_dir / PROCESS) if (run_dir / PROCESS).is_file() else {}
    return not (isinstance(process, dict) and process.get("host") == socket.gethostname() and _alive(process.get("pid")))


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


def start_over(run_dir: Path) -> None:
    """Empties the directory of a run that stopped before its first checkpoint."""
    print(f"{run_dir}: a run that stopped before its first checkpoint (nothing to resume); starting it over", flush=True)
    for child in run_dir.iterdir():
        _remove(child)


def _remove(path: Path) -> None:
    """Removes a file, a link or a directory tree (a link to a directory: the link only)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def inside_package(path: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(PACKAGE_DIR)


def output_dir(out: str | None, run: str, name: str) -> Path:
    """Where a command that reads a run writes its results (``evaluate``, ``critical``): ``--out``
    if given; otherwise RUN/<name>, or ./<name>-<checkpoint> for a checkpoint shipped inside the
    installed package, which is never written to."""
    if out is None:
        source = Path(run).resolve()
        source = source.parent if source.name == "model" else source
        out = f"{name}-{source.name}" if inside_package(source) else str(Path(run) / name)
    check_output(out, "--out", directory=True)
    return Path(out)


def check_output(path: str | None, flag: str, directory: bool = False) -> None:
    """A UserError for an output path inside the installed package, of the wrong sort, or where
    nothing can be written (a file in its way, a read-only or virtual file system such as /proc, no
    permission), checked by creating and removing a temporary directory where the output will go."""
    if path is None:
        return
    if inside_package(path):
        raise UserError(f"{flag} {path} is inside the installed package ({PACKAGE_DIR}); choose a path outside it")
    if directory and Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory")
    if not directory and Path(path).is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    writable(path if directory else Path(path).parent, flag, path)


def writable(directory: str | Path, flag: str, path: str | Path) -> None:
    """A UserError unless a directory can be created at the first existing level of ``directory``."""
    existing = Path(os.path.abspath(directory))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-test."))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({e.strerror})") from None


@contextmanager
def no_half_made_run(config):
    """Around a training command (a config with ``out`` and ``resume``): if a fresh run fails before
    its first checkpoint, whatever it created is removed. Such a directory cannot be resumed and
    would only block the next try ("already exists")."""
    out = getattr(config, "out", None)
    if not isinstance(out, str) or getattr(config, "resume", True):
        yield
        return
    run_dir = Path(out)
    existed = run_dir.exists()
    fresh = not existed or (run_dir.is_dir() and not any(run_dir.iterdir()))
    created = run_dir  # the highest directory the run creates: --out a/b/c may create a/
    while not existed and not created.parent.exists():
        created = created.parent
    try:
        yield
    except BaseException:
        if fresh and run_dir.is_dir() and not (run_dir / CHECKPOINT).exists():
            for child in run_dir.iterdir() if existed else [created]:  # an empty --out that was there stays
                _remove(child)
        raise


class Timer:
    """Accumulates wall time per named phase: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()


def git_commit(first_added: str | None = None) -> str | None:
    """The commit of the package's git checkout (with "-dirty" when tracked files differ from it), or
    with ``first_added`` (a path in the repository) the commit that first added that file; None when
    the package is not in a git checkout or git is missing."""
    import subprocess

    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        if first_added:
            root = git("rev-parse", "--show-toplevel")
            commits = git("-C", root, "log", "--diff-filter=A", "--format=%H", "--", first_added).split()
            return commits[-1] if commits else None
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None

"""Small C kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

A kernel is one C file in this package. Its shared library is built with `-O3 -march=native` (so it uses the CPU's
vector units) and cached under `$VSECTL_CACHE/native`, else `~/.cache/vsectl/native` (where that cannot be written,
a folder of this user's in the temporary directory), named by the sha256 of the source, the compiler's version and
the CPU's flags: a library built on one kind of CPU is never loaded on another.
The build writes a temporary file and renames it, so concurrent processes (DDP ranks, a sweep's jobs) never load a
half-written library. A compiler that runs past BUILD_TIMEOUT_S is stopped with every process it started.

Loading a library runs its code, so the rules of a private temporary folder apply to every cache location: a folder
that is a link, belongs to another user or that others can write is not used (this user's temporary folder is, with a
warning); a library is loaded only through the record (`NAME-KEY.json`) written when this user built it, and only
if it is this user's, writable by nobody else, and its sha256 is the recorded one. A file planted under a predictable
name is never loaded.

Where no compiler is found, the build fails or `VSECTL_NATIVE=0` is set, `load` returns None and `status` says
why; callers then use their torch path, say so once in the log, and `env.json` records it (`native_kernels`).
Set `CC` to choose the compiler (e.g. `CC="ccache gcc"`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent
BUILD_TIMEOUT_S = 120
_loaded: dict[str, ctypes.CDLL | None] = {}
_status: dict[str, str] = {}
_open_fds: list[int] = []  # descriptors of the loaded libraries (see `load`)


def cache_dir() -> Path:
    """Where built libraries are kept: $VSECTL_CACHE/native, else ~/.cache/vsectl/native."""
    root = os.environ.get("VSECTL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vsectl") / "native"


def enabled() -> bool:
    """False when VSECTL_NATIVE is set to 0 (or false/no/off): every caller then takes its torch path."""
    return os.environ.get("VSECTL_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _compiler() -> list[str] | None:
    """The compiler command: $CC split like a shell would (e.g. "ccache gcc"), else the first of cc, gcc, clang.

    Raises:
        ValueError: $CC cannot be split (an unbalanced quote).
    """
    cc = os.environ.get("CC")
    if cc:
        try:
            words = shlex.split(cc)
        except ValueError as e:
            raise ValueError(f"CC={cc[:80]!r} is not a command line ({e})") from None
        if not words:
            return None
        found = shutil.which(words[0]) or (words[0] if Path(words[0]).is_file() else None)
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own; past `timeout` the whole group is killed (a compiler driver's
    children too, which would otherwise be left running and keep its output pipes open)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, errs = proc.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, errs)


def _compiler_version(cc: list[str], timeout: float = 30) -> str:
    try:
        done = _run([*cc, "--version"], timeout)
    except OSError:
        return "unknown"
    except subprocess.TimeoutExpired:  # a compiler that hangs here hangs on the build too
        raise RuntimeError(f"{Path(cc[0]).name} --version ran longer than {timeout:g} s and was stopped") from None
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_key() -> str:
    return platform.machine() + ":" + " ".join(sorted(cpu_flags()))


def _temp_cache() -> Path:
    """Where libraries go when the cache folder cannot be written (a read-only home): this user's temporary folder."""
    return Path(tempfile.gettempdir()) / f"vsectl-native-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _unsafe(st: os.stat_result) -> str | None:
    """Why a folder or file with this lstat may not hold libraries to load (None when it may): another user who can
    write it could put code there that would run as this one."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"can be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_folder(folder: Path) -> Path:
    """`folder` made (mode 0700) or checked to be this user's own, not a link, writable by nobody else: a library
    loaded from a folder another user can write to would run their code."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot create {folder}: {exc.strerror}") from None
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or _unsafe(st):
        raise RuntimeError(f"{folder} is not a private folder of this user's; remove it or set VSECTL_CACHE")
    return folder


def _cache_folder() -> Path:
    """The cache folder if it is this user's and nobody else can write it, else this user's temporary one (said)."""
    preferred = cache_dir()
    if _writable(preferred):
        why = _unsafe(os.lstat(preferred)) or (None if preferred.is_dir() else "is not a folder")
        if why is None:
            return preferred
        fallback = _private_folder(_temp_cache())
        log.warning("not loading native kernels from %s: it %s; using %s instead (make the folder yours and not "
                    "writable by others: chmod go-w, or set VSECTL_CACHE)", preferred, why, fallback)
        return fallback
    return _private_folder(_temp_cache())


def _first_error(said: str, returncode: int) -> str:
    lines = said.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit {returncode}"])[0].strip()


def _read_fd(fd: int) -> bytes:
    chunks = []
    while block := os.read(fd, 1 << 20):
        chunks.append(block)
    return b"".join(chunks)


def _open_verified(folder: Path, stem: str) -> tuple[int, str] | None:
    """The library `stem` its record names in `folder`, opened after checking that the folder and the file are this
    user's alone and that the file's sha256 is the one recorded when it was built; with the path to load it by (the
    open descriptor itself on Linux, so nothing swapped in after the check is loaded). None when there is none."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow)
    try:
        why = _unsafe(os.fstat(dfd))
        if why:
            raise RuntimeError(f"{folder} {why}")
        try:
            rfd = os.open(f"{stem}.json", os.O_RDONLY | nofollow, dir_fd=dfd)
        except FileNotFoundError:
            return None
        try:
            if _unsafe(os.fstat(rfd)):
                return None
            record = json.loads(_read_fd(rfd))
        except ValueError:
            return None
        finally:
            os.close(rfd)
        file = record.get("file") if isinstance(record, dict) else None
        if not isinstance(file, str) or os.path.basename(file) != file or not file.startswith(stem):
            return None
        try:
            fd = os.open(file, os.O_RDONLY | nofollow, dir_fd=dfd)
        except FileNotFoundError:
            return None
        st = os.fstat(fd)
        why = _unsafe(st) or (None if stat.S_ISREG(st.st_mode) else "is not a regular file")
        if why or hashlib.sha256(_read_fd(fd)).hexdigest() != record.get("sha256"):
            os.close(fd)
            log.warning("not loading %s: it %s; building it again", folder / file,
                        why or "differs from the sha256 recorded when it was built")
            return None
        return fd, (f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(folder / file))
    finally:
        os.close(dfd)


def _compile(source: Path, cc: list[str], tmp: str, deadline: float) -> None:
    errors = []
    for flags in (["-O3", "-march=native"], ["-O3"]):  # some compilers/CPUs refuse -march=native
        cmd = [*cc, *flags, "-std=c99", "-fPIC", "-shared", "-o", tmp, str(source)]
        try:
            done = _run(cmd, deadline - time.monotonic())
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{Path(cc[0]).name} ran longer than {BUILD_TIMEOUT_S} s and was stopped") from None
        except OSError as exc:
            errors.append(str(exc))
            continue
        if done.returncode == 0:
            return
        errors.append(_first_error(done.stderr or done.stdout, done.returncode))
    raise RuntimeError(f"{Path(cc[0]).name} failed: {'; '.join(dict.fromkeys(errors))}")


def _build(name: str, source: Path, cc: list[str]) -> tuple[int, str]:
    """Compile `source` into the cache (or reuse a library built from the same source, compiler and CPU kind whose
    recorded hash still matches); returns it opened (see `_open_verified`)."""
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    text = source.read_bytes()
    version = _compiler_version(cc, min(30.0, BUILD_TIMEOUT_S))
    key = hashlib.sha256(text + b"\0" + version.encode() + b"\0" + _cpu_key().encode()).hexdigest()
    stem = f"{name}-{key[:20]}"
    folder = _cache_folder()
    found = _open_verified(folder, stem)
    if found is not None:
        return found
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        _compile(source, cc, tmp, deadline)
        os.chmod(tmp, 0o755)
        with open(tmp, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        target = folder / f"{stem}.{digest[:16]}.so"  # named by its hash: a concurrent build never overwrites it
        os.replace(tmp, target)
        fd, rec = tempfile.mkstemp(prefix=f".{stem}-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w") as fh:
            json.dump({"file": target.name, "sha256": digest, "compiler": version}, fh)
        os.chmod(rec, 0o644)
        os.replace(rec, folder / f"{stem}.json")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    found = _open_verified(folder, stem)
    if found is None:
        raise RuntimeError(f"the library built in {folder} changed before it could be loaded")
    return found


def load(name: str) -> ctypes.CDLL | None:
    """The kernel `name` (this package's `name`.c) as a loaded library, or None (see `status` for why). Cached."""
    if name in _loaded:
        return _loaded[name]
    lib, cc = None, None
    if not enabled():
        _status[name] = "off (VSECTL_NATIVE=0)"
    else:
        try:
            cc = _compiler()
            missing = "no C compiler found (install gcc or set CC)"
        except ValueError as exc:  # an unbalanced quote in $CC
            missing = f"no C compiler: {exc}"
        if cc is None:
            _status[name] = missing
    if cc is not None:
        try:
            fd, path = _build(name, SOURCES / f"{name}.c", cc)
        except (OSError, RuntimeError) as exc:
            _status[name] = f"build failed ({exc})"
        else:
            try:
                lib = ctypes.CDLL(path)
                _status[name] = "native"
                _open_fds.append(fd)  # kept open: the loader knows the library by this /proc/self/fd name, which a
                # closed and reused descriptor would give to another library
            except OSError as exc:  # built but not loadable (e.g. a noexec mount)
                _status[name] = f"load failed ({exc})"
                os.close(fd)
    _loaded[name] = lib
    return lib


def status() -> dict[str, str]:
    """What each kernel asked for so far runs as: 'native', or why it runs on its torch path."""
    return dict(_status)


KERNELS = ("sortsets",)


def describe(build: bool = True) -> dict[str, str]:
    """Each kernel's state for env.json: 'native', or why it runs on its torch path; with `build`, loads (and if
    need be builds) them first, else kernels not asked for yet read 'not used'."""
    if build:
        for name in KERNELS:
            load(name)
    return {name: _status.get(name, "not used") for name in KERNELS}


def reset() -> None:
    """Forget loaded kernels (tests; a later `load` builds or finds the library again)."""
    _loaded.clear()
    _status.clear()

"""Small C kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

A kernel is one C file in this package. Its shared library is built with `-O3 -march=native` (so it uses the CPU's
vector units) and cached under `$VSECTL_CACHE/native`, else `~/.cache/vsectl/native` (where that cannot be written,
a folder of this user's in the temporary directory), named by the sha256 of the source, the compiler's version and
the CPU's flags: a library built on one kind of CPU is never loaded on another.
The build writes a temporary file and renames it, so concurrent processes (DDP ranks, a sweep's jobs) never load a
half-written library.

Where no compiler is found, the build fails or `VSECTL_NATIVE=0` is set, `load` returns None and `status` says
why; callers then use their torch path, say so once in the log, and `env.json` records it (`native_kernels`).
Set `CC` to choose the compiler (e.g. `CC="ccache gcc"`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent
BUILD_TIMEOUT_S = 120
_loaded: dict[str, ctypes.CDLL | None] = {}
_status: dict[str, str] = {}


def cache_dir() -> Path:
    """Where built libraries are kept: $VSECTL_CACHE/native, else ~/.cache/vsectl/native."""
    root = os.environ.get("VSECTL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vsectl") / "native"


def enabled() -> bool:
    """False when VSECTL_NATIVE is set to 0 (or false/no/off): every caller then takes its torch path."""
    return os.environ.get("VSECTL_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _compiler() -> list[str] | None:
    """The compiler command: $CC split like a shell would (e.g. "ccache gcc"), else the first of cc, gcc, clang."""
    cc = os.environ.get("CC")
    if cc:
        words = shlex.split(cc)
        if not words:
            return None
        found = shutil.which(words[0]) or (words[0] if Path(words[0]).is_file() else None)
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _compiler_version(cc: list[str]) -> str:
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
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


def _private_folder(folder: Path) -> Path:
    """`folder` made (mode 0700) or checked to be this user's own, not a link, writable by nobody else: a library
    loaded from a folder another user can write to would run their code."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot create {folder}: {exc.strerror}") from None
    st = os.lstat(folder)
    own = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or not own or st.st_mode & 0o022:
        raise RuntimeError(f"{folder} is not a private folder of this user's; remove it or set VSECTL_CACHE")
    return folder


def _first_error(said: str, returncode: int) -> str:
    lines = said.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit {returncode}"])[0].strip()


def _build(name: str, source: Path, cc: list[str]) -> Path:
    """Compile `source` into the cache (or reuse a library built from the same source, compiler and CPU kind)."""
    text = source.read_bytes()
    key = hashlib.sha256(text + b"\0" + _compiler_version(cc).encode() + b"\0" + _cpu_key().encode()).hexdigest()
    filename = f"{name}-{key[:20]}.so"
    folder = cache_dir() if _writable(cache_dir()) else _private_folder(_temp_cache())
    target = folder / filename
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
    os.close(fd)
    errors = []
    try:
        for flags in (["-O3", "-march=native"], ["-O3"]):  # some compilers/CPUs refuse -march=native
            cmd = [*cc, *flags, "-std=c99", "-fPIC", "-shared", "-o", tmp, str(source)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
                continue
            if done.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
                return target
            errors.append(_first_error(done.stderr or done.stdout, done.returncode))
        raise RuntimeError(f"{Path(cc[0]).name} failed: {'; '.join(dict.fromkeys(errors))}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str) -> ctypes.CDLL | None:
    """The kernel `name` (this package's `name`.c) as a loaded library, or None (see `status` for why). Cached."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    if not enabled():
        _status[name] = "off (VSECTL_NATIVE=0)"
    elif (cc := _compiler()) is None:
        _status[name] = "no C compiler found (install gcc or set CC)"
    else:
        try:
            path = _build(name, SOURCES / f"{name}.c", cc)
        except (OSError, RuntimeError) as exc:
            _status[name] = f"build failed ({exc})"
        else:
            try:
                lib = ctypes.CDLL(str(path))
                _status[name] = "native"
            except OSError as exc:  # built but not loadable (e.g. a noexec mount): do not keep it
                path.unlink(missing_ok=True)
                _status[name] = f"load failed ({exc})"
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

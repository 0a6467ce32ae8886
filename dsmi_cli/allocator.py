"""A caching memory allocator for the PyTorch commands, preloaded by re-executing once.

On a small CPU machine about half of a plain PyTorch training process's time goes to the
kernel: glibc's malloc returns freed tensor memory to the system and every new tensor faults
its pages in again. tcmalloc keeps the memory it freed (docs/results.md: the measured
speed-up). It has to be loaded before anything else, so the command re-executes itself with
``LD_PRELOAD`` set, once; ``DSMI_ALLOCATOR=system`` turns this off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["ALLOCATORS", "ALLOCATOR_ENV", "find_allocator", "ensure_caching_allocator"]

ALLOCATOR_ENV = "DSMI_ALLOCATOR"
# name -> (library file names, Debian package)
ALLOCATORS: dict[str, tuple[tuple[str, ...], str]] = {
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "libtcmalloc-minimal4"),
    "jemalloc": (("libjemalloc.so.2",), "libjemalloc2"),
}
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib")


def find_allocator(name: str, dirs: tuple[str, ...] | None = None) -> Path | None:
    """The shared library of allocator ``name`` on this machine, or ``None``."""
    files, _ = ALLOCATORS[name]
    for folder in dirs or _LIBRARY_DIRS:
        for file in files:
            path = Path(folder) / file
            if path.is_file():
                return path
    return None


def ensure_caching_allocator(command: str, argv: list[str],
                             environ: dict[str, str] | None = None,
                             execute=os.execve) -> str:
    """Re-execute ``dsmi <argv>`` with the caching allocator preloaded, unless it already is,
    ``DSMI_ALLOCATOR=system`` asks for none, or it is not installed (one line on stderr says
    so and how to install it). Returns what the process runs with: the library or "system".
    """
    env = dict(os.environ if environ is None else environ)
    name = env.get(ALLOCATOR_ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if name == "system":
        return "system"
    if name not in ALLOCATORS:
        print(f"dsmi {command}: {ALLOCATOR_ENV}={name!r} is not one of "
              f"{', '.join([*ALLOCATORS, 'system'])}; using the system allocator",
              file=sys.stderr)
        return "system"
    preloaded = env.get("LD_PRELOAD", "")
    files, package = ALLOCATORS[name]
    if any(file in preloaded for file in files):
        return name
    path = find_allocator(name)
    if path is None:
        print(f"dsmi {command}: {name} is not installed (apt-get install {package}): running "
              f"with the system allocator, which can make training about half as fast "
              f"(set {ALLOCATOR_ENV}=system to silence this)", file=sys.stderr)
        return "system"
    env["LD_PRELOAD"] = f"{path}:{preloaded}" if preloaded else str(path)
    execute(sys.executable, [sys.executable, "-m", "dsmi_cli", *argv], env)
    return name  # only reached when ``execute`` returns (tests)

"""Host memory of the command lines: back large allocations with transparent huge pages.

XLA's CPU runtime allocates each step's intermediates afresh (the tiny default run's train step
holds about 560 MB of temporaries) and frees them at the end of the step. glibc serves blocks that
large with mmap and unmaps them when freed, so every step faults its whole working set back in,
4 KiB at a time: the default run took 55 million minor page faults in 400 steps, a third of its
CPU time in the kernel. With glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35 and later),
malloc asks for transparent huge pages on those mappings (madvise), so a step faults 2 MiB at a
time: measured on the default run's step, 20x fewer page faults and 15% less time per step.

A glibc tunable is read only when a process starts, so `use_huge_pages()` starts the command again
(os.execv, same process id and arguments) with it set in GLIBC_TUNABLES. train.py, eval.py,
generate.py and `python -m hnet.perf.bench` call it first thing; `import hnet` alone changes nothing.
Nothing happens outside Linux, where the kernel has transparent huge pages off, when the tunable
is already set, or with HNET_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_pages_available() -> bool:
    """The kernel gives transparent huge pages to memory that asks (mode "always" or "madvise")."""
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def use_huge_pages() -> None:
    """Restart this command with GLIBC_TUNABLES asking malloc for transparent huge pages (see the
    module docstring); returns without doing anything when that is already so or does not apply."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        os.environ.get("HNET_HUGE_PAGES", "1") == "0"
        or "glibc.malloc.hugetlb" in tunables
        or not sys.platform.startswith("linux")
        or not _huge_pages_available()
    ):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)

"""The command lines restart themselves with malloc on transparent huge pages (hnet.host_memory)."""

import os
import subprocess
import sys

from hnet import host_memory
from conftest import ROOT

PROBE = (
    "from hnet.host_memory import use_huge_pages; use_huge_pages(); "
    "import os, sys; print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
)


def probe(**env_changes) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "HNET_HUGE_PAGES")}
    env.update(env_changes)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--an", "argument"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return out.split(maxsplit=1)


def test_the_command_restarts_with_the_tunable_and_its_arguments():
    tunables, rest = probe()
    if host_memory._huge_pages_available() and sys.platform.startswith("linux"):
        assert tunables == host_memory.TUNABLE
    else:
        assert tunables == "None"
    assert rest.strip().endswith("['--an', 'argument']")  # the same arguments after the restart


def test_existing_tunables_are_kept_and_the_switch_turns_it_off():
    tunables, _ = probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    if host_memory._huge_pages_available() and sys.platform.startswith("linux"):
        assert tunables == f"glibc.malloc.arena_max=4:{host_memory.TUNABLE}"
    assert probe(HNET_HUGE_PAGES="0")[0] == "None"

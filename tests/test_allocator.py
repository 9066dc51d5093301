"""polypure.allocator: freed large blocks are reused, not mapped and zeroed afresh (glibc on Linux)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# a child process: the allocator is a setting of the whole process, and this one has it set by Experiment
CHILD = """
import json, resource, sys
import torch
from polypure.allocator import keep_freed_memory
kept = keep_freed_memory()
faults, resident = [], []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(64 * 2**20 // 4)      # 64 MiB, written in full
    objects = [object() for _ in range(100)] # small allocations between the large ones, as in a real run
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    resident.append(int(open("/proc/self/statm").read().split()[1]) * 4096)
    del block
print(json.dumps({"kept": kept, "again": keep_freed_memory(), "faults": faults, "resident": resident}))
"""

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _child(setting: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "POLYPURE_KEEP_FREED_MEMORY"}
    if setting is not None:
        env["POLYPURE_KEEP_FREED_MEMORY"] = setting
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's (Linux); elsewhere nothing changes")
def test_freed_blocks_are_reused_without_page_faults():
    kept = _child(None)
    default = _child("0")
    assert kept["kept"] and kept["again"]
    assert not default["kept"] and not default["again"]
    # a 64 MiB block is 16384 pages: glibc's default maps every new one afresh and gives it back when it is freed
    pages = 64 * 2**20 // 4096
    assert all(f > pages // 2 for f in default["faults"]), default["faults"]
    # the kept heap reuses freed blocks once a few are free (torch asks for 64-byte aligned blocks, which a freed
    # block of exactly the same size cannot hold until it merges with a neighbour): no page faults in the end,
    # and the resident memory stops growing (here at most 8 blocks above the first)
    assert all(f < pages // 20 for f in kept["faults"][-4:]), kept["faults"]
    # (within 1 MiB: the interpreter's own small allocations may take a page or two)
    assert abs(kept["resident"][-1] - kept["resident"][-4]) < 2**20, kept["resident"]
    assert kept["resident"][-1] - kept["resident"][0] <= 9 * 64 * 2**20, kept["resident"]


def test_off_switch_leaves_the_allocator_alone():
    assert _child("0")["kept"] is False

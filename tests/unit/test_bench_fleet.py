"""`plora bench fleet`'s memory figure counts a page that processes share once, as the machine
holds it: Ray's workers all map the same device half."""

import subprocess
import sys
import time

from plora.platform.bench.fleet import MEMORY_EVERY_S, MB, _peak_memory

SHARED_MB = 64
MAPS_AND_WAITS = """
import mmap, sys
with open(sys.argv[1], "rb") as file:
    mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE))
    print("mapped", flush=True)
    sys.stdin.read()
"""


def test_a_file_two_processes_map_counts_once_in_the_peak(tmp_path):
    shared = tmp_path / "device-half.bin"
    shared.write_bytes(b"\1" * (SHARED_MB * 2**20))
    # A program of its own name, so that no other child of this process (multiprocessing's
    # resource tracker is a `python -c` too) counts with the two.
    program = tmp_path / "maps_and_waits.py"
    program.write_text(MAPS_AND_WAITS)
    with _peak_memory() as peak:
        children = [subprocess.Popen([sys.executable, str(program), str(shared)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            assert [child.stdout.readline() for child in children] == ["mapped\n"] * 2
            time.sleep(4 * MEMORY_EVERY_S)
        finally:
            for child in children:
                child.communicate("")
    mapping = SHARED_MB * 2**20 / MB
    children_mb = peak.pss_by_kind[program.name] / MB
    assert mapping <= children_mb <= mapping + 40, "once, and the two interpreters' own memory, a few MB each"

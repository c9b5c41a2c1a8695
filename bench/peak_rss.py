"""Run one bench job script and record its process's own peak RSS (VmHWM, KiB) when it exits.

`ru_maxrss` from wait4 cannot be used: at exec Linux folds the parent's resident size (a multi-GB test
or harness process) into the child's maximum, so every job would report at least its parent's size.
VmHWM belongs to the memory map created by exec, so it is the job's alone.

    python peak_rss.py RSS_FILE SCRIPT [ARGS...]
"""

import atexit
import runpy
import sys


def record_peak(path: str) -> None:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(peak)


if __name__ == "__main__":
    rss_file, script = sys.argv[1], sys.argv[2]
    atexit.register(record_peak, rss_file)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
    runpy.run_path(script, run_name="__main__")

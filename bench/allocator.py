"""The allocator settings of `models.keep_freed_memory` against the ones before them, on the same instrugo
command, alternating: wall time, time of the steps after the first (metrics.jsonl), minor page faults and
peak RSS of each run.

"before" is glibc's mmap threshold at 32 MiB, no trimming and a 256 MiB top pad, given through the
environment (instrugo leaves glibc alone when the environment sets one of its malloc settings,
`models.MALLOC_SETTINGS_IN_ENVIRONMENT`); "now" is the code's own settings (no mmap, no trimming, 256 MiB
top pad), glibc's malloc kept (INSTRUGO_MALLOC=glibc: the command would otherwise restart with tcmalloc);
"now_huge_pages" adds PyTorch's transparent huge pages (THP_MEM_ALLOC_ENABLE=1); "jemalloc" and "tcmalloc"
replace glibc's malloc altogether (LD_PRELOAD of the system's library, e.g. Debian's libjemalloc2 and
libtcmalloc-minimal4; glibc's settings then do nothing). Usage:
    .venv/bin/python bench/allocator.py [--rounds 2] [--settings before now now_huge_pages] -- sft --max-examples 192
The command's --out is added (a fresh temporary path per run: the run directory, or `sample`'s tasks file)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The glibc settings keep the `instrugo` command from restarting itself with tcmalloc (INSTRUGO_MALLOC=glibc).
GLIBC = {"INSTRUGO_MALLOC": "glibc"}
SETTINGS = {
    "before": {**GLIBC, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
               "MALLOC_TOP_PAD_": str(256 * 2**20)},
    "now": GLIBC,
    # Tried and not kept: the code's settings plus PyTorch's blocks of 2 MiB and more on transparent huge pages.
    "now_huge_pages": {**GLIBC, "THP_MEM_ALLOC_ENABLE": "1"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
}


def one_run(command: list[str], extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "INSTRUGO_MALLOC")}
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "out", Path(tmp) / "stderr.log"
        start = time.perf_counter()
        with open(log, "wb") as stderr:  # a file, not a pipe: progress bars would fill a pipe and stall the run
            child = subprocess.Popen([str(Path(sys.executable).with_name("instrugo")), *command, "--out", str(out)],
                                     env={**env, **extra_env}, stdout=subprocess.DEVNULL, stderr=stderr)
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            sys.exit(f"{' '.join(command)} failed: {log.read_text()[-2000:]}")
        metrics = out / "metrics.jsonl"  # training stages; `sample` writes one file and has no steps
        times = [json.loads(line)["time"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return {"wall_s": round(wall, 1), "steps_after_first_s": round(times[-1] - times[0], 1) if times else None,
            "minor_faults": usage.ru_minflt, "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["before", "now"])
parser.add_argument("command", nargs=argparse.REMAINDER, help="instrugo command after --")
args = parser.parse_args()
command = args.command[1:] if args.command[:1] == ["--"] else args.command
for round_index in range(args.rounds):
    for name in args.settings:
        print(json.dumps({"round": round_index + 1, "setting": name, **one_run(command, SETTINGS[name])}), flush=True)

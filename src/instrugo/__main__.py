"""The `instrugo` command (also `python -m instrugo`): restarts itself with tcmalloc as its malloc where the
system has it, then runs the command line (`instrugo.cli`). The restart comes first: a preloaded library must
be there when the process starts, and importing the command line loads PyTorch.

Against glibc's malloc with `models.keep_freed_memory`'s settings, alternating on the demo's settings, tcmalloc
took SFT, reward-model and PPO steps 1.13-1.45x as fast with 0.6-1.8 GiB less peak RSS (docs/BENCHMARKS.md,
"tcmalloc"). `make demo` and `make test` install it where apt-get can (Debian/Ubuntu: libtcmalloc-minimal4);
`INSTRUGO_MALLOC=glibc` keeps glibc's."""

from __future__ import annotations

import ctypes.util
import os
import sys

# Tried in turn: libtcmalloc-minimal4's library, then libgoogle-perftools4's. Not jemalloc (libjemalloc2):
# in the same comparison its SFT steps were 0.85x as fast as glibc's.
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


def tcmalloc_environment(environ: dict[str, str], find_library) -> dict[str, str] | None:
    """The environment to restart in with tcmalloc preloaded, or None: not Linux, no tcmalloc found by
    `find_library`, a library preloaded already (`LD_PRELOAD` set: yours wins, and the restarted command
    finds it set), or `INSTRUGO_MALLOC=glibc`. tcmalloc's warning on each allocation over 1 GiB (a
    vocabulary-sized block) is turned off unless you set its threshold."""
    if (not sys.platform.startswith("linux") or environ.get("LD_PRELOAD")
            or environ.get("INSTRUGO_MALLOC", "auto") == "glibc"):
        return None
    library = next(filter(None, map(find_library, TCMALLOC_LIBRARIES)), None)
    if library is None:
        return None
    return {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40), **environ, "LD_PRELOAD": library}


def restart_with_tcmalloc() -> None:
    """Replace this process by itself (same PID and arguments, so a launcher such as torchrun still sees
    its child) with tcmalloc preloaded; the stages' processes inherit it. Goes on with glibc's malloc where
    tcmalloc is missing or the restart fails."""
    environment = tcmalloc_environment(dict(os.environ), ctypes.util.find_library)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environment)
    except OSError:
        pass


def main() -> None:
    restart_with_tcmalloc()
    from instrugo.cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()

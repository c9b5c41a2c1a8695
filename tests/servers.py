"""A command-line server in a subprocess, for the tests that talk to a real one over HTTP."""

import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(module_and_args: list[str], probe: str, timeout_s: float = 60):
    """`python -m MODULE ARGS --port P` on a free port, once GET `probe` answers; yields (base url, process)
    and ends it afterwards."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", *module_and_args, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                httpx.get(base + probe, timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {process.stderr.read().decode()}") from None
                time.sleep(0.1)
        yield base, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=10)

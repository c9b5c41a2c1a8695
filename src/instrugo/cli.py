"""Command line entry point (filled in as stages land)."""


def main() -> None:
    raise SystemExit("instrugo: CLI not wired yet")

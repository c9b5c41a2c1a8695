"""`instrugo data`: statistics of the shipped splits or your files, validation, export."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from instrugo.data.files import SHIPPED_PREFIX, chat_row, load_examples, load_split, read_split
from instrugo.data.generate import SPLITS
from instrugo.data.stats import dataset_stats
from instrugo.runio import InputError, atomic_write_jsonl

app = typer.Typer(help="The InstruGo dataset and your own data: statistics, validation, export.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class ExportFormat(str, Enum):
    jsonl = "jsonl"
    chat = "chat"


def fail(error: InputError) -> None:
    typer.echo(f"invalid: {error}", err=True)
    raise typer.Exit(1)


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def stats_table(title: str, stats: dict) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [("records", str(stats["n"])), ("topics", str(stats["topics"])),
            ("with response", str(stats["with_response"])),
            ("constraints per prompt", number(stats["constraints_per_prompt"], 2)),
            ("mean prompt words", number(stats["prompt_words"])),
            ("mean response words", number(stats["response_words"])),
            ("mean text words", number(stats["text_words"])),
            ("held out", str(stats["heldout"])),
            ("demonstrations passing the judge", number(stats["demonstrations_passing"], 3)),
            ("demonstration gold score", number(stats["demonstration_gold_score"], 3))]
    rows += [(f"kind: {kind}", str(count)) for kind, count in stats["kinds"].items()]
    for name, value in rows:
        if value not in ("-", "0") or name == "records":
            table.add_row(name, value)
    return table


@app.command()
def stats(specs: Optional[list[str]] = typer.Argument(
        None, help="instrugo:SPLIT or JSONL paths (default: every shipped split).")) -> None:
    """Counts, constraint kinds, mean lengths and judge pass rates, one table per split."""
    console = Console()
    try:
        for spec in specs or [SHIPPED_PREFIX + s for s in SPLITS]:
            for split, split_stats in dataset_stats(load_examples(spec))["splits"].items():
                console.print(stats_table(f"{spec} ({split})", split_stats))
    except InputError as error:
        fail(error)


@app.command()
def validate(path: Path = typer.Argument(..., help="A JSONL file of {prompt, response} or {messages} lines.")) -> None:
    """Check a data file; prints a one-line summary, or the first error (file, line, field) and exits 1."""
    try:
        records = load_examples(str(path))
    except InputError as error:
        fail(error)
    with_response = sum("response" in r for r in records)
    with_constraints = sum(bool(r.get("constraints")) for r in records)
    typer.echo(f"{path}: {len(records)} examples OK ({with_response} with responses, "
               f"{with_constraints} with constraints)")


@app.command()
def export(split: str = typer.Argument(..., help=f"One of {', '.join(SPLITS)} (or instrugo:SPLIT)."),
           out: Path = typer.Option(..., "--out", help="Where to write the JSONL file."),
           format: ExportFormat = typer.Option(ExportFormat.jsonl, "--format",
                                               help="jsonl: InstruGo records; chat: {messages} with the response.")) -> None:
    """Write a shipped split to a file, as InstruGo records or as chat messages."""
    split = split.removeprefix(SHIPPED_PREFIX)
    try:
        if format is ExportFormat.jsonl:
            rows = list(read_split(split))
        else:
            records = load_split(split)
            if not all("response" in r for r in records):
                raise InputError(SHIPPED_PREFIX + split, "has no responses to export as chat; use --format jsonl")
            rows = [chat_row(r) for r in records]
    except InputError as error:
        fail(error)
    atomic_write_jsonl(out, rows)
    typer.echo(f"wrote {len(rows)} {split} records ({format.value}) to {out}")

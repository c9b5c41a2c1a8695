"""`instrugo label ...`: serve the labeling app and administer it from the shell.

    instrugo label import --db labels.sqlite tasks.jsonl --overlap 0.1
    instrugo label add-labeler --db labels.sqlite alice        # prints alice's token, once
    instrugo label serve --db labels.sqlite                    # http://127.0.0.1:8000 (admin: /admin)
    instrugo label status --db labels.sqlite
    instrugo label export --db labels.sqlite --out labeled.jsonl
"""

from __future__ import annotations

from pathlib import Path

import typer

from instrugo.comparisons import read_tasks
from instrugo.labeling.storage import LabelStore, NotFound
from instrugo.runio import atomic_write_jsonl

app = typer.Typer(help="Rankings: the labeling web app, its admin side, and simulated labelers.",
                  no_args_is_help=True, add_completion=False)

DB = typer.Option(Path("labels.sqlite"), "--db", help="The labeling database (SQLite; created if missing).")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


@app.command()
def serve(db: Path = DB,
          host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all)."),
          port: int = typer.Option(8000, "--port", help="TCP port.")) -> None:
    """Run the web app: labelers at /, the admin dashboard at /admin, the API under /api/."""
    import uvicorn

    from instrugo.labeling.server import create_app

    typer.echo(f"label: serving {db} at http://{host}:{port}/ (dashboard: /admin, API: /api/openapi.json)")
    uvicorn.run(create_app(db), host=host, port=port, log_level="warning")


@app.command("import")
def import_tasks(tasks: Path = typer.Argument(..., help="Comparison tasks JSONL (`instrugo sample` output)."),
                 db: Path = DB,
                 overlap: float = typer.Option(0.0, "--overlap", help="Share of tasks ranked by several labelers "
                                                                       "(for agreement), e.g. 0.1."),
                 copies: int = typer.Option(2, "--copies", help="Labelers per overlapping task."),
                 seed: int = typer.Option(0, "--seed", help="Seed for choosing the overlapping tasks.")) -> None:
    """Import tasks; importing the same file again adds nothing."""
    report = LabelStore(db).import_tasks(read_tasks(tasks), str(tasks), overlap, copies, seed)
    typer.echo(f"label: imported {report['added']} tasks ({report['overlapping']} for {copies} labelers), "
               f"{report['already_present']} already present, into {db}")


@app.command("add-labeler")
def add_labeler(name: str = typer.Argument(..., help="The labeler's name (shown in exports and the dashboard)."),
                db: Path = DB,
                admin: bool = typer.Option(False, "--admin", help="An admin token (dashboard and admin API).")) -> None:
    """Create a labeler and print their token (stored only as a hash: copy it now)."""
    token = LabelStore(db).add_labeler(name, "admin" if admin else "labeler")
    typer.echo(token)


@app.command()
def revoke(name: str = typer.Argument(..., help="The labeler to revoke."), db: Path = DB) -> None:
    """Revoke a labeler's token; their unfinished tasks go back to the pool. Their labels stay."""
    try:
        released = LabelStore(db).revoke(name)
    except NotFound as error:
        typer.echo(f"label: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"label: revoked {name}; {released} unfinished tasks released")


@app.command()
def export(db: Path = DB, out: Path = typer.Option(..., "--out", help="Where to write the labeled JSONL.")) -> None:
    """Write every label in the ranking format `instrugo rm` reads, with each label's labeler and time."""
    rows = LabelStore(db).export_rows()
    atomic_write_jsonl(out, rows)
    typer.echo(f"label: exported {len(rows)} labels to {out}")


@app.command()
def status(db: Path = DB) -> None:
    """Progress, agreement and per-labeler numbers (the dashboard, as text)."""
    d = LabelStore(db).dashboard()
    inter = d["inter_labeler"]
    typer.echo(f"tasks {d['tasks_done']}/{d['tasks']} done, labels {d['labels']}/{d['labels_wanted']}, "
               f"skipped {d['skipped']}, open {d['open']}, last 24 h {sum(d['labels_per_hour'])}")
    typer.echo(f"inter-labeler agreement {percent(inter['agreement'])} on {inter['pairs']} pairs "
               f"({inter['tasks']} tasks with several labels)")
    for p in d["labelers"]:
        state = "revoked" if p["revoked"] else p["role"]
        typer.echo(f"  {p['name']:<16} {state:<8} labeled {p['labeled']:>5}  skipped {p['skipped']:>4}  "
                   f"open {p['open']:>3}  last hour {p['last_hour']:>4}  "
                   f"agreement with majority {percent(p['agreement_with_majority'])}")


if __name__ == "__main__":  # `python -m instrugo.labeling.cli serve ...` starts without the training stack
    app()

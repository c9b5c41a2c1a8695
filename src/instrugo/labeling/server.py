"""The labeling web app: a JSON API under /api/ and two pages (labeler `/`, admin dashboard `/admin`).

Every API call carries `Authorization: Bearer <token>`; the pages keep the token in the browser and call
the same API, so there are no cookies and no cross-site request forgery to defend against. Model text is
untrusted: the pages insert it with `textContent` only, and a strict Content-Security-Policy (scripts from
this origin only, no inline script) makes an injected `<script>` or `onerror=` inert even if that slipped.

    uvicorn is started by `instrugo label serve`; `create_app(db)` is the ASGI app (tests use it directly).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations, which name aliases
# (`Me`, `Admin`) local to create_app.
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel, Field

from instrugo.comparisons import FLAGS, parse_task
from instrugo.labeling.storage import Conflict, Label, LabelError, Labeler, LabelStore, NotFound
from instrugo.runio import InputError

HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# What the labeler page shows for each flag, and the key that toggles it.
FLAG_LABELS = {"fails_instruction": ("fails to follow the instruction", "i"),
               "satisfies_constraint": ("satisfies the constraint", "c"),
               "inappropriate": ("inappropriate", "n"), "hallucination": ("hallucination", "h"),
               "harmful_advice": ("harmful advice", "a")}


class LabelIn(BaseModel):
    """A label in the positions the responses were shown in (0 = the first shown)."""

    ranking: list[list[int] | int] = Field(description="Shown positions, best tie group first, e.g. [[2], [0, 3], [1]].")
    scores: list[int] | None = Field(None, description="A 1..7 score per shown response.")
    flags: list[list[str]] | None = Field(None, description=f"Flags per shown response, from {', '.join(FLAGS)}.")
    seconds: float | None = Field(None, description="Time the labeler spent on the task.")


class SkipIn(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


class LabelerIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    admin: bool = False


class ImportIn(BaseModel):
    tasks: list[dict[str, Any]] = Field(description="Comparison-task rows as `instrugo sample` writes them.")
    overlap: float = Field(0.0, ge=0, le=1, description="Share of the tasks ranked by several labelers.")
    copies: int = Field(2, ge=2, le=9, description="Labelers per overlapping task.")
    seed: int = 0


def create_app(db: str | Path) -> FastAPI:
    store = LabelStore(db)
    app = FastAPI(title="instrugo labeling", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description="Rank comparison tasks. Authenticate with `Authorization: Bearer <token>` "
                              "(`instrugo label add-labeler` prints tokens).")
    bearer = HTTPBearer(auto_error=False)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def signed_in(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Labeler:
        labeler = store.authenticate(credentials.credentials) if credentials else None
        if labeler is None:
            raise HTTPException(401, "missing, unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
        return labeler

    def labeler_only(labeler: Annotated[Labeler, Depends(signed_in)]) -> Labeler:
        if labeler.role != "labeler":
            raise HTTPException(403, "admin tokens do not label; create a labeler token")
        return labeler

    def admin_only(labeler: Annotated[Labeler, Depends(signed_in)]) -> Labeler:
        if labeler.role != "admin":
            raise HTTPException(403, "admin only")
        return labeler

    Me = Annotated[Labeler, Depends(labeler_only)]
    Admin = Annotated[Labeler, Depends(admin_only)]

    # -- labeler API ----------------------------------------------------------------------------------

    @app.get("/api/me", tags=["labeler"])
    def me(labeler: Me) -> dict:
        """Who I am and my progress: labeled, skipped, open (assigned, unfinished), waiting (not yet assigned)."""
        return store.progress(labeler)

    @app.get("/api/tasks/next", tags=["labeler"], responses={204: {"description": "No tasks left for you."}})
    def next_task(labeler: Me) -> Any:
        """My next task: the prompt and its responses in my own random order. `id` names my assignment."""
        task = store.next_task(labeler)
        return task if task is not None else Response(status_code=204)

    @app.get("/api/tasks/{assignment_id}", tags=["labeler"])
    def get_task(assignment_id: int, labeler: Me) -> dict:
        """One of my tasks, with my label if I labeled it."""
        try:
            return store.get_task(labeler, assignment_id)
        except NotFound as error:
            raise HTTPException(404, str(error)) from None

    @app.post("/api/tasks/{assignment_id}/label", tags=["labeler"])
    def submit_label(assignment_id: int, body: LabelIn, labeler: Me, response: Response) -> dict:
        """Rank (and score, flag) one of my tasks. Idempotent: a repeat returns the stored label, 200 not 201."""
        label = Label([g if isinstance(g, list) else [g] for g in body.ranking], body.scores, body.flags, body.seconds)
        try:
            task, created = store.submit_label(labeler, assignment_id, label)
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
        except Conflict as error:
            raise HTTPException(409, str(error)) from None
        except LabelError as error:
            raise HTTPException(422, str(error)) from None
        response.status_code = 201 if created else 200
        return task

    @app.post("/api/tasks/{assignment_id}/skip", tags=["labeler"], status_code=204)
    def skip(assignment_id: int, body: SkipIn, labeler: Me) -> None:
        """Skip one of my tasks with a reason; another labeler gets it."""
        try:
            store.skip(labeler, assignment_id, body.reason)
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
        except Conflict as error:
            raise HTTPException(409, str(error)) from None
        except LabelError as error:
            raise HTTPException(422, str(error)) from None

    # -- admin API ------------------------------------------------------------------------------------

    @app.get("/api/admin/dashboard", tags=["admin"])
    def dashboard(admin: Admin) -> dict:
        """Progress, throughput (labels per hour, last 24 h), inter-labeler and per-labeler agreement."""
        return store.dashboard()

    @app.post("/api/admin/labelers", tags=["admin"], status_code=201)
    def add_labeler(body: LabelerIn, admin: Admin) -> dict:
        """Create a labeler (or admin); the token is shown this once."""
        try:
            token = store.add_labeler(body.name, "admin" if body.admin else "labeler")
        except InputError as error:
            raise HTTPException(409, error.message) from None
        return {"name": body.name, "token": token}

    @app.post("/api/admin/labelers/{name}/revoke", tags=["admin"])
    def revoke(name: str, admin: Admin) -> dict:
        """Revoke a token; the labeler's unfinished tasks go back to the pool."""
        try:
            return {"name": name, "released": store.revoke(name)}
        except NotFound as error:
            raise HTTPException(404, str(error)) from None

    @app.post("/api/admin/tasks", tags=["admin"])
    def import_tasks(body: ImportIn, admin: Admin) -> dict:
        """Import comparison tasks (the rows of `instrugo sample` output)."""
        try:
            tasks = [parse_task(row, "request", number, require_ranking=False)
                     for number, row in enumerate(body.tasks, start=1)]
            return store.import_tasks(tasks, "request", body.overlap, body.copies, body.seed)
        except InputError as error:
            raise HTTPException(422, str(error)) from None

    @app.get("/api/admin/export", tags=["admin"], response_class=PlainTextResponse)
    def export(admin: Admin) -> PlainTextResponse:
        """All labels as comparison-task JSONL (what `instrugo label export` writes)."""
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in store.export_rows())
        return PlainTextResponse(text, media_type="application/x-ndjson",
                                 headers={"Content-Disposition": 'attachment; filename="labels.jsonl"'})

    # -- pages ----------------------------------------------------------------------------------------

    templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def labeler_page(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "labeler.html", {"flags": json.dumps(FLAG_LABELS)})

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin_page(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "dashboard.html", {})

    return app

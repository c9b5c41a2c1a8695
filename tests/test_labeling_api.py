"""Labeling app through its JSON API (in-process HTTP client): auth, assignment, validation, idempotency,
overlap and agreement, skips, revocation, export, schema migrations and the admin CLI."""

import hashlib
import sqlite3

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from instrugo.comparisons import FLAGS, ComparisonTask, read_tasks
from instrugo.labeling import agreement
from instrugo.labeling.cli import app as label_cli
from instrugo.labeling.server import create_app
from instrugo.labeling.storage import MIGRATIONS, Label, LabelStore
from instrugo.runio import InputError, atomic_write_jsonl


def make_tasks(n: int, k: int = 4) -> list[ComparisonTask]:
    return [ComparisonTask(id=f"t{i:03d}", prompt=f"Prompt {i}", responses=[f"response {i}.{j}" for j in range(k)],
                           example={"topic": "bees"}, extra={"policy": "runs/sft"}) for i in range(n)]


@pytest.fixture
def store(tmp_path):
    return LabelStore(tmp_path / "labels.sqlite")


@pytest.fixture
def client(store):
    with TestClient(create_app(store.path)) as c:
        yield c


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def shown_ranking(task: dict, best_first: list[int]) -> list[list[int]]:
    """A strict ranking in shown positions that orders the *original* responses as `best_first`."""
    position = {text: i for i, text in enumerate(task["responses"])}
    return [[position[f"{task['prompt'].replace('Prompt', 'response')}.{j}"]] for j in best_first]


def test_unauthenticated_wrong_role_and_revoked_requests_are_refused(store, client):
    store.import_tasks(make_tasks(2), "tasks")
    labeler, admin = store.add_labeler("ann"), store.add_labeler("boss", "admin")
    for method, path in [("get", "/api/tasks/next"), ("post", "/api/tasks/1/label"), ("get", "/api/me"),
                         ("get", "/api/admin/dashboard"), ("get", "/api/admin/export")]:
        assert client.request(method, path).status_code == 401
        assert client.request(method, path, headers=auth("ig_not-a-token")).status_code == 401
    for path in ["/api/admin/dashboard", "/api/admin/export"]:
        assert client.get(path, headers=auth(labeler)).status_code == 403
    assert client.post("/api/admin/labelers", json={"name": "eve", "admin": True}, headers=auth(labeler)).status_code == 403
    assert client.get("/api/tasks/next", headers=auth(admin)).status_code == 403  # admins do not label
    assert client.get("/api/admin/dashboard", headers=auth(admin)).status_code == 200
    store.revoke("ann")
    assert client.get("/api/tasks/next", headers=auth(labeler)).status_code == 401


def test_tokens_are_stored_hashed(store):
    token = store.add_labeler("ann")
    raw = b"".join(p.read_bytes() for p in store.path.parent.glob("labels.sqlite*"))
    assert token.encode() not in raw
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT token_hash FROM labelers").fetchone()[0] == hashlib.sha256(token.encode()).hexdigest()
    assert store.authenticate(token).name == "ann"
    assert store.authenticate(token + "x") is None


def test_label_in_shown_order_is_exported_in_original_order(store, client, tmp_path):
    store.import_tasks(make_tasks(1), "tasks")
    token = store.add_labeler("ann")
    task = client.get("/api/tasks/next", headers=auth(token)).json()
    assert sorted(task["responses"]) == [f"response 0.{j}" for j in range(4)]
    original = [int(text.rsplit(".", 1)[1]) for text in task["responses"]]  # original index at each position
    # Original response 2 best, then 0 and 3 tied, then 1; scores and flags by shown position.
    pos = {o: p for p, o in enumerate(original)}
    ranking = [[pos[2]], [pos[0], pos[3]], [pos[1]]]
    scores = [{2: 7, 0: 4, 3: 4, 1: 1}[o] for o in original]
    flags = [["hallucination"] if o == 1 else [] for o in original]
    r = client.post(f"/api/tasks/{task['id']}/label", json={"ranking": ranking, "scores": scores, "flags": flags,
                                                            "seconds": 12.5}, headers=auth(token))
    assert r.status_code == 201
    assert r.json()["label"]["scores"] == scores
    out = tmp_path / "labeled.jsonl"
    atomic_write_jsonl(out, store.export_rows())
    [labeled] = read_tasks(out, require_ranking=True)
    assert labeled.id == "t000" and labeled.labeler == "ann"
    assert labeled.ranking == [[2], [0, 3], [1]]
    assert labeled.scores == [4, 1, 7, 4]
    assert labeled.flags == [[], ["hallucination"], [], []]
    assert labeled.example == {"topic": "bees"} and labeled.extra["policy"] == "runs/sft"
    assert isinstance(labeled.extra["time"], float)
    assert client.get("/api/tasks/next", headers=auth(token)).status_code == 204


def test_second_submit_returns_the_stored_label_and_stores_nothing_new(store, client):
    store.import_tasks(make_tasks(1), "tasks")
    token = store.add_labeler("ann")
    task = client.get("/api/tasks/next", headers=auth(token)).json()
    first = client.post(f"/api/tasks/{task['id']}/label", json={"ranking": [0, 1, 2, 3]}, headers=auth(token))
    again = client.post(f"/api/tasks/{task['id']}/label", json={"ranking": [0, 1, 2, 3]}, headers=auth(token))
    other = client.post(f"/api/tasks/{task['id']}/label", json={"ranking": [3, 2, 1, 0]}, headers=auth(token))
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 200)
    assert first.json() == again.json() == other.json()
    assert first.json()["label"]["ranking"] == [[0], [1], [2], [3]]
    assert len(store.export_rows()) == 1


@pytest.mark.parametrize("body, message", [
    ({"ranking": [0, 1, 2]}, "permutation"),
    ({"ranking": [0, 1, 2, 2]}, "permutation"),
    ({"ranking": [0, 1, 2, 4]}, "index"),
    ({"ranking": [[0, 1], [], [2, 3]]}, "empty"),
    ({"ranking": [0, 1, 2, 3], "scores": [1, 2, 3, 8]}, "scores"),
    ({"ranking": [0, 1, 2, 3], "scores": [1, 2, 3]}, "scores"),
    ({"ranking": [0, 1, 2, 3], "flags": [["toxic"], [], [], []]}, "unknown flags"),
    ({"ranking": [0, 1, 2, 3], "flags": [[], [], []]}, "flags"),
])
def test_invalid_labels_are_refused_and_not_stored(store, client, body, message):
    store.import_tasks(make_tasks(1), "tasks")
    token = store.add_labeler("ann")
    task = client.get("/api/tasks/next", headers=auth(token)).json()
    r = client.post(f"/api/tasks/{task['id']}/label", json=body, headers=auth(token))
    assert r.status_code == 422 and message in r.json()["detail"]
    assert store.export_rows() == []
    assert client.post(f"/api/tasks/{task['id']}/label", json={"ranking": [1, 0, 2, 3]},
                       headers=auth(token)).status_code == 201


def test_labelers_see_and_label_only_their_own_tasks(store, client):
    store.import_tasks(make_tasks(2), "tasks")
    ann, bob = store.add_labeler("ann"), store.add_labeler("bob")
    a = client.get("/api/tasks/next", headers=auth(ann)).json()
    b = client.get("/api/tasks/next", headers=auth(bob)).json()
    assert a["task_id"] != b["task_id"]
    assert client.get("/api/tasks/next", headers=auth(ann)).json()["id"] == a["id"]  # same open task on reload
    assert client.get(f"/api/tasks/{b['id']}", headers=auth(ann)).status_code == 404
    assert client.post(f"/api/tasks/{b['id']}/label", json={"ranking": [0, 1, 2, 3]}, headers=auth(ann)).status_code == 404
    assert client.post(f"/api/tasks/{b['id']}/skip", json={"reason": "x"}, headers=auth(ann)).status_code == 404
    assert store.export_rows() == []


def test_display_order_is_random_per_labeler(store, client):
    store.import_tasks([ComparisonTask(id="t", prompt="p", responses=[f"r{j}" for j in range(9)])], "tasks", overlap=1,
                       copies=9)
    orders = {tuple(client.get("/api/tasks/next", headers=auth(store.add_labeler(f"l{i}"))).json()["responses"])
              for i in range(9)}
    assert len(orders) > 1  # nine labelers all shown one order: probability (1/9!)^8


def test_overlap_agreement_dashboard_and_export(store, client, tmp_path):
    report = store.import_tasks(make_tasks(10), "tasks", overlap=0.2, copies=2, seed=1)
    assert report == {"added": 10, "already_present": 0, "overlapping": 2}
    tokens = {name: store.add_labeler(name) for name in ("ann", "bob")}
    tokens["boss"] = store.add_labeler("boss", "admin")
    # ann ranks original responses 0 > 1 > 2 > 3 everywhere; bob reverses 2 and 3.
    for name, best_first in (("ann", [0, 1, 2, 3]), ("bob", [0, 1, 3, 2])):
        while (r := client.get("/api/tasks/next", headers=auth(tokens[name]))).status_code == 200:
            task = r.json()
            assert client.post(f"/api/tasks/{task['id']}/label", json={"ranking": shown_ranking(task, best_first)},
                               headers=auth(tokens[name])).status_code == 201
    dash = client.get("/api/admin/dashboard", headers=auth(tokens["boss"])).json()
    assert (dash["tasks"], dash["tasks_done"], dash["labels"], dash["labels_wanted"]) == (10, 10, 12, 12)
    assert dash["inter_labeler"]["tasks"] == 2
    assert dash["inter_labeler"]["agreement"] == pytest.approx(5 / 6)  # 6 pairs per task, one disagrees
    by_name = {p["name"]: p for p in dash["labelers"]}
    assert by_name["ann"]["agreement_with_majority"] == pytest.approx(5 / 6)
    assert by_name["ann"]["labeled"] + by_name["bob"]["labeled"] == 12
    assert sum(dash["labels_per_hour"]) == 12
    exported = client.get("/api/admin/export", headers=auth(tokens["boss"]))
    out = tmp_path / "labeled.jsonl"
    out.write_text(exported.text)
    tasks = read_tasks(out, require_ranking=True)
    assert len(tasks) == 12 and sum(":" in t.id for t in tasks) == 4


def test_skip_hands_the_task_to_someone_else(store, client):
    store.import_tasks(make_tasks(1), "tasks")
    ann, bob = store.add_labeler("ann"), store.add_labeler("bob")
    task = client.get("/api/tasks/next", headers=auth(ann)).json()
    assert client.get("/api/tasks/next", headers=auth(bob)).status_code == 204
    assert client.post(f"/api/tasks/{task['id']}/skip", json={"reason": ""}, headers=auth(ann)).status_code == 422
    assert client.post(f"/api/tasks/{task['id']}/skip", json={"reason": "unclear"}, headers=auth(ann)).status_code == 204
    assert client.post(f"/api/tasks/{task['id']}/label", json={"ranking": [0, 1, 2, 3]},
                       headers=auth(ann)).status_code == 409
    assert client.get("/api/tasks/next", headers=auth(ann)).status_code == 204
    assert client.get("/api/tasks/next", headers=auth(bob)).json()["task_id"] == task["task_id"]
    assert client.get("/api/me", headers=auth(ann)).json() == {"name": "ann", "labeled": 0, "skipped": 1, "open": 0,
                                                               "waiting": 0}


def test_revoking_releases_unfinished_tasks(store, client):
    store.import_tasks(make_tasks(1), "tasks")
    ann, bob = store.add_labeler("ann"), store.add_labeler("bob")
    client.get("/api/tasks/next", headers=auth(ann))
    assert client.get("/api/tasks/next", headers=auth(bob)).status_code == 204
    assert store.revoke("ann") == 1
    assert client.get("/api/tasks/next", headers=auth(bob)).status_code == 200


def test_admin_api_creates_labelers_and_imports(store, client):
    boss = store.add_labeler("boss", "admin")
    r = client.post("/api/admin/labelers", json={"name": "ann"}, headers=auth(boss))
    assert r.status_code == 201 and store.authenticate(r.json()["token"]).name == "ann"
    assert client.post("/api/admin/labelers", json={"name": "ann"}, headers=auth(boss)).status_code == 409
    rows = [t.to_json() for t in make_tasks(3)]
    r = client.post("/api/admin/tasks", json={"tasks": rows}, headers=auth(boss))
    assert r.json() == {"added": 3, "already_present": 0, "overlapping": 0}
    bad = client.post("/api/admin/tasks", json={"tasks": [{"prompt": "p", "responses": ["a", "a"]}]}, headers=auth(boss))
    assert bad.status_code == 422 and "duplicate responses" in bad.json()["detail"]
    twice = client.post("/api/admin/tasks", json={"tasks": [rows[0], rows[0]]}, headers=auth(boss))
    assert twice.status_code == 422 and "duplicate task id 't000'" in twice.json()["detail"]
    assert client.post("/api/admin/labelers/ann/revoke", headers=auth(boss)).json() == {"name": "ann", "released": 0}


def test_reimport_is_a_noop_and_changed_content_is_refused(store):
    tasks = make_tasks(3)
    store.import_tasks(tasks, "tasks")
    assert store.import_tasks(tasks, "tasks")["added"] == 0
    changed = make_tasks(3)
    changed[1].responses[0] = "something else"
    with pytest.raises(InputError, match="t001"):
        store.import_tasks(changed, "tasks.jsonl")


def test_schema_is_versioned_and_migrated(tmp_path):
    path = tmp_path / "labels.sqlite"
    store = LabelStore(path)
    assert store.schema_version() == len(MIGRATIONS)
    token = store.add_labeler("ann")
    assert LabelStore(path).authenticate(token).name == "ann"  # reopening migrates nothing, keeps data
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(InputError, match="newer"):
        LabelStore(path)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError, match="not a labeling database"):
        LabelStore(garbage)


def test_pages_are_served_with_a_strict_csp(client):
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script src=\"/static/labeler.js\"" in page.text and "<script>" not in page.text
    assert client.get("/admin").status_code == 200
    spec = client.get("/api/openapi.json").json()
    assert {"/api/tasks/next", "/api/tasks/{assignment_id}/label"} <= set(spec["paths"])


def test_admin_cli_import_add_export_status_revoke(tmp_path):
    runner = CliRunner()
    db, tasks, out = tmp_path / "l.sqlite", tmp_path / "tasks.jsonl", tmp_path / "labeled.jsonl"
    atomic_write_jsonl(tasks, [t.to_json() for t in make_tasks(4)])
    result = runner.invoke(label_cli, ["import", str(tasks), "--db", str(db), "--overlap", "0.5"])
    assert result.exit_code == 0 and "imported 4 tasks (2 for 2 labelers)" in result.output
    result = runner.invoke(label_cli, ["add-labeler", "ann", "--db", str(db)])
    token = result.output.strip()
    store = LabelStore(db)
    ann = store.authenticate(token)
    task = store.next_task(ann)
    store.submit_label(ann, task["id"], Label([[0], [1, 2], [3]], scores=[7, 5, 5, 1], flags=[[], [], [], [FLAGS[0]]]))
    result = runner.invoke(label_cli, ["export", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0 and "exported 1 labels" in result.output
    assert read_tasks(out, require_ranking=True)[0].labeler == "ann"
    result = runner.invoke(label_cli, ["status", "--db", str(db)])
    assert "/4 done, labels 1/6, skipped 0, open 0" in result.output and "ann" in result.output
    assert runner.invoke(label_cli, ["revoke", "ann", "--db", str(db)]).exit_code == 0
    assert runner.invoke(label_cli, ["revoke", "ann", "--db", str(db)]).exit_code == 1


def test_agreement_functions():
    assert agreement.preferences([[2], [0, 1]]) == {(0, 2): -1, (1, 2): -1}
    assert agreement.pair_agreement([[0], [1], [2]], [[0], [2], [1]]) == (2, 3)
    assert agreement.pair_agreement([[0, 1, 2]], [[0], [1], [2]]) == (0, 0)  # ties say nothing
    labels = [{"a": [[0], [1]], "b": [[0], [1]], "c": [[1], [0]]}]
    majority = agreement.majority_agreement(labels)
    assert majority == {"c": {"agreement": 0.0, "pairs": 1}}  # for a (and b) the others split: no majority
    inter = agreement.inter_labeler_agreement(labels)
    assert inter["agreement"] == pytest.approx(1 / 3) and inter["pairs"] == 3

"""Human feedback end to end: `instrugo sample` (tiny) → labels through the HTTP API → export → `instrugo rm`."""

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from instrugo import runio
from instrugo.cli import app
from instrugo.comparisons import read_tasks
from instrugo.labeling.server import create_app
from instrugo.labeling.storage import LabelStore


def test_sampled_tasks_labeled_through_the_api_train_a_reward_model(tmp_path):
    runner = CliRunner()
    tasks, db, labeled = tmp_path / "tasks.jsonl", tmp_path / "labels.sqlite", tmp_path / "labeled.jsonl"
    result = runner.invoke(app, ["sample", "--preset", "tiny", "--n-prompts", "12", "--k", "4", "--out", str(tasks)])
    assert result.exit_code == 0, result.output
    sampled = read_tasks(tasks)
    assert sampled and all(len(t.responses) >= 2 and not t.is_labeled for t in sampled)

    assert runner.invoke(app, ["label", "import", "--db", str(db), str(tasks)]).exit_code == 0
    token = LabelStore(db).add_labeler("ann")
    submitted = 0
    with TestClient(create_app(db)) as client:
        headers = {"Authorization": f"Bearer {token}"}
        while (response := client.get("/api/tasks/next", headers=headers)).status_code == 200:
            task = response.json()
            # A person who prefers longer answers: rank the shown responses by length, best first.
            order = sorted(range(len(task["responses"])), key=lambda i: -len(task["responses"][i]))
            body = {"ranking": [[i] for i in order], "scores": [7 - min(6, rank) for rank in range(len(order))]}
            body["scores"] = [body["scores"][order.index(i)] for i in range(len(order))]
            assert client.post(f"/api/tasks/{task['id']}/label", json=body, headers=headers).status_code == 201
            submitted += 1
        assert response.status_code == 204
    assert submitted == len(sampled)

    assert runner.invoke(app, ["label", "export", "--db", str(db), "--out", str(labeled)]).exit_code == 0
    exported = read_tasks(labeled, require_ranking=True)
    assert len(exported) == len(sampled) and {t.labeler for t in exported} == {"ann"}
    for task in exported:  # stored in the file's original order: the longest response ranks first
        assert task.ranking[0] == [max(range(len(task.responses)), key=lambda i: len(task.responses[i]))]

    result = runner.invoke(app, ["rm", "--preset", "tiny", "--comparisons", str(labeled), "--out", str(tmp_path / "rm"),
                                 "--normalize-data", ""])
    assert result.exit_code == 0, result.output
    assert runio.is_complete(tmp_path / "rm")
    assert runio.read_json(tmp_path / "eval.json")["reward_model"]["n_comparisons"] == sum(len(t.pairs()) for t in exported)

"""Labeling app as a real server (uvicorn in a subprocess): 16 concurrent labelers, SIGKILL under load,
and a real browser (Playwright driving Debian's chromium) that signs in, ranks, scores, flags and
submits, with XSS payloads in the model text."""

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from instrugo.comparisons import ComparisonTask
from instrugo.labeling.storage import LabelStore
from servers import running_server

CHROMIUM = "/usr/bin/chromium"


def label_server(db: Path):
    """`instrugo label serve` (through the labeling CLI alone: faster to start); yields (base url, process)."""
    return running_server(["instrugo.labeling.cli", "serve", "--db", str(db)], "/api/openapi.json", timeout_s=30)


def tasks(n: int, k: int = 4) -> list[ComparisonTask]:
    return [ComparisonTask(id=f"t{i:05d}", prompt=f"Prompt {i}", responses=[f"answer {i}.{j}" for j in range(k)])
            for i in range(n)]


def label_tasks(base: str, token: str, limit: int, acknowledged: list, errors: list) -> None:
    """One labeler's loop: next task, rank it (reversed shown order), record every 2xx."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            for _ in range(limit):
                r = client.get("/api/tasks/next")
                if r.status_code == 204:
                    return
                task = r.json()
                ranking = list(reversed(range(len(task["responses"]))))
                r = client.post(f"/api/tasks/{task['id']}/label", json={"ranking": ranking})
                if r.status_code not in (200, 201):
                    errors.append(r.text)
                    return
                acknowledged.append((token, task["id"], task["responses"][ranking[0]]))
    except httpx.TransportError as error:  # the server was killed
        errors.append(error)


def test_16_concurrent_labelers_store_exactly_1600_labels(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_tasks(tasks(1700), "tasks")
    tokens = [store.add_labeler(f"l{i:02d}") for i in range(16)]
    acknowledged, errors = [], []
    with label_server(store.path) as (base, _):
        threads = [threading.Thread(target=label_tasks, args=(base, token, 100, acknowledged, errors))
                   for token in tokens]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    assert errors == []
    rows = store.export_rows()
    assert len(acknowledged) == len(rows) == 1600
    assert len({row["id"] for row in rows}) == 1600  # no task handed to two labelers
    per_labeler = {}
    for row in rows:
        per_labeler[row["labeler"]] = per_labeler.get(row["labeler"], 0) + 1
    assert per_labeler == {f"l{i:02d}": 100 for i in range(16)}
    print(f"1600 labels from 16 labelers in {elapsed:.1f} s ({1600 / elapsed:.0f} labels/s)")


def test_sigkill_under_load_loses_no_acknowledged_label(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_tasks(tasks(5000), "tasks")
    tokens = [store.add_labeler(f"l{i}") for i in range(8)]
    acknowledged, errors = [], []
    with label_server(store.path) as (base, process):
        threads = [threading.Thread(target=label_tasks, args=(base, token, 10_000, acknowledged, errors))
                   for token in tokens]
        for t in threads:
            t.start()
        while len(acknowledged) < 200:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        for t in threads:
            t.join()
    assert len(errors) == len(tokens)  # every labeler was cut off mid-stream
    with label_server(store.path) as (base, _):
        for token, assignment, best in acknowledged:
            r = httpx.get(f"{base}/api/tasks/{assignment}", headers={"Authorization": f"Bearer {token}"})
            label = r.json()["label"]
            assert label is not None, f"acknowledged label of task {assignment} lost"
            assert r.json()["responses"][label["ranking"][0][0]] == best
    print(f"{len(acknowledged)} acknowledged labels before SIGKILL, {len(store.export_rows())} stored, all present")


XSS = ['<script>window.__xss = "script"</script>',
       '<img src=x onerror="window.__xss = \'img\'">',
       '<a href="javascript:window.__xss = \'link\'">click me</a>',
       '<svg onload="window.__xss = \'svg\'"></svg>']


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (make browser)")
def test_browser_signs_in_ranks_scores_flags_submits_and_xss_stays_inert(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    store = LabelStore(tmp_path / "labels.sqlite")
    prompt = "Say hi " + XSS[0]
    store.import_tasks([ComparisonTask(id="xss", prompt=prompt, responses=[f"Response {j}: {XSS[j]}" for j in range(4)]),
                        *tasks(1)], "tasks")
    token = store.add_labeler("ann")
    with label_server(store.path) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(base + "/")
        page.fill("#token", token)
        page.press("#token", "Enter")
        page.wait_for_selector("#work:not([hidden])")

        # Model text shows as text: no element was created from it and nothing ran.
        assert page.text_content("#prompt") == prompt
        shown = page.locator("#responses .response .text").all_text_contents()
        assert sorted(shown) == sorted(f"Response {j}: {XSS[j]}" for j in range(4))
        assert page.locator("#work script, #work img, #work a, #work svg").count() == 0

        # Score with the keyboard (1..7 scores the selected response and selects the next one).
        for key in "6352":
            page.keyboard.press(key)
        # Flag response B with the mouse, response D with its key.
        page.click('.response[data-pos="1"] input[data-flag="hallucination"]')
        page.click('.response[data-pos="3"] .letter')
        page.keyboard.press("a")  # harmful advice
        # Ranking follows the scores: A(6) > C(5) > B(3) > D(2). Tie C with A, then move D above B.
        assert page.locator("#ranking li").evaluate_all("rows => rows.map(r => r.dataset.pos)") == ["0", "2", "1", "3"]
        page.click('.response[data-pos="2"] .letter')
        page.keyboard.press("t")
        page.click('.response[data-pos="3"] .letter')
        page.keyboard.press("u")
        assert page.text_content('.response[data-pos="2"] .rank-badge') == "rank 1 (tie)"
        page.keyboard.press("Enter")
        expect(page.locator("#prompt")).to_have_text("Prompt 0")  # the next task, without a page load

        # Nothing in the model text ran at any point of the session.
        page.click("#signout")
        assert page.evaluate("window.__xss") is None and dialogs == []
        browser.close()

    [labeled] = [row for row in store.export_rows() if row["id"] == "xss"]
    original = {position: labeled["responses"].index(text) for position, text in enumerate(shown)}
    assert labeled["ranking"] == [sorted(original[s] for s in group) for group in [[0, 2], [3], [1]]]
    assert [labeled["scores"][original[s]] for s in range(4)] == [6, 3, 5, 2]
    assert [labeled["flags"][original[s]] for s in range(4)] == [[], ["hallucination"], [], ["harmful_advice"]]
    assert labeled["labeler"] == "ann"

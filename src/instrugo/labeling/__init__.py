"""The labeling web app: people rank comparison tasks that `instrugo sample` wrote.

    storage.py    SQLite store: labelers and hashed tokens, tasks, assignments with overlap, labels
    agreement.py  pure functions: pairwise agreement between rankings, agreement with the majority
    server.py     FastAPI app: the JSON API under /api/ (Bearer tokens) and the two pages
    cli.py        `instrugo label serve|import|add-labeler|revoke|export|status`
    templates/, static/   the labeler page and the admin dashboard (vanilla JS, no CDN)

Data flow: tasks JSONL → `label import` → labelers pull tasks one at a time (`GET /api/tasks/next`) and
rank them (`POST /api/tasks/{id}/label`) → `label export` writes the same JSONL with rankings filled in,
which `instrugo rm` trains on.
"""

"""The InstruGo dataset: generator invariants, the shipped files, user-data validation and the CLI."""

import hashlib
import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from instrugo.data import (DATASET_SEED, SPLITS, UNSEEN_KINDS, dataset_stats, generate, load_examples,
                           load_split)
from instrugo.data.cli import app
from instrugo.data.generate import SEEN_KINDS, generate_prompt_split
from instrugo.data.topics import TOPICS
from instrugo.judge import CONSTRAINT_KINDS, check_constraint, gold_judge
from instrugo.judge.text import words
from instrugo.runio import InputError

PROMPT_SPLITS = ("sft", "rm", "ppo", "eval", "eval_unseen")


def digest(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {split: [{k: v for k, v in r.items() if k != "messages"} for r in load_split(split)] for split in SPLITS}


def test_shipped_files_equal_a_fresh_generation(shipped):
    fresh = generate(DATASET_SEED)  # ~3 s; if this fails, run `python -m instrugo.data.build`
    assert {s: digest(r) for s, r in fresh.items()} == {s: digest(r) for s, r in shipped.items()}


def test_generation_is_deterministic_and_depends_on_the_seed():
    first, again = generate_prompt_split("eval", 7, set()), generate_prompt_split("eval", 7, set())
    assert first == again
    assert [r["prompt"] for r in generate_prompt_split("eval", 8, set())] != [r["prompt"] for r in first]


def test_split_sizes(shipped):
    for split in ("sft", "rm", "ppo", "pretrain"):
        assert len(shipped[split]) >= 2000, split
    assert len(shipped["eval"]) >= 300 and len(shipped["eval_unseen"]) >= 300
    heldout = sum(r["heldout"] for r in shipped["pretrain"])
    assert 0.05 < heldout / len(shipped["pretrain"]) < 0.15


def test_pretrain_heldout_part_shares_no_sentence_with_the_ptx_text(shipped):
    """The alignment tax is measured on text PPO-ptx's pretraining term never sees, not on recombined training
    sentences. Every fact is one sentence, so no shared fact means no shared sentence."""
    facts = {topic["name"]: topic["facts"] for topic in TOPICS}
    training_text = "\n".join(r["text"] for r in shipped["pretrain"] if not r["heldout"])
    heldout_facts = {fact for r in shipped["pretrain"] if r["heldout"] for fact in facts[r["topic"]] if fact in r["text"]}
    assert len(heldout_facts) > 50
    assert not [fact for fact in heldout_facts if fact in training_text]


def test_no_prompt_is_in_two_splits_and_ids_are_unique(shipped):
    prompts = [r["prompt"] for s in PROMPT_SPLITS for r in shipped[s]]
    assert len(prompts) == len(set(prompts))
    ids = [r["id"] for s in SPLITS for r in shipped[s]]
    assert len(ids) == len(set(ids))


def test_every_demonstration_passes_its_verifiers_on_topic(shipped):
    lengths = []
    for record in shipped["sft"]:
        verdict = gold_judge(record, record["response"])
        assert verdict.all_passed, (record["id"], verdict.reasons)
        assert verdict.score >= 0.9 and verdict.topicality >= 0.7, (record["id"], verdict)
        lengths.append(len(words(record["response"])))
    mostly_short = sum(20 <= n <= 120 for n in lengths) / len(lengths)
    assert mostly_short > 0.9


def test_prompts_have_one_to_three_known_compatible_constraints(shipped):
    for split in PROMPT_SPLITS:
        for record in shipped[split]:
            kinds = [c["kind"] for c in record["constraints"]]
            assert 1 <= len(kinds) <= 3 and set(kinds) <= set(CONSTRAINT_KINDS)
            assert len(set(kinds)) == len(kinds)
            for c in record["constraints"]:
                check_constraint(c, "")  # args fit the verifier
            assert "response" in record if split == "sft" else "response" not in record


def test_eval_unseen_uses_kinds_absent_from_training_splits(shipped):
    training = {c["kind"] for s in ("sft", "rm", "ppo", "eval") for r in shipped[s] for c in r["constraints"]}
    unseen = {c["kind"] for r in shipped["eval_unseen"] for c in r["constraints"]}
    assert len(set(UNSEEN_KINDS)) >= 4 and not training & set(UNSEEN_KINDS)
    assert set(UNSEEN_KINDS) <= unseen
    assert all({c["kind"] for c in r["constraints"]} & set(UNSEEN_KINDS) for r in shipped["eval_unseen"])
    assert training == set(SEEN_KINDS)  # every training kind is actually used


def test_prompts_are_varied(shipped):
    openings = Counter(" ".join(r["prompt"].split()[:2]) for r in shipped["rm"])
    assert len(openings) >= 8 and openings.most_common(1)[0][1] < 0.25 * len(shipped["rm"])
    topics = Counter(r["topic"] for r in shipped["ppo"])
    assert max(topics.values()) <= 2 * min(topics.values()) + 2  # topics are balanced


def test_loaded_records_carry_chat_messages():
    record = load_examples("instrugo:sft")[0]
    assert record["messages"] == [{"role": "user", "content": record["prompt"]}]
    assert isinstance(record["response"], str) and record["constraints"]


def test_dataset_stats():
    stats = dataset_stats(load_split("sft")[:50] + load_split("pretrain")[:10])
    assert stats["n"] == 60
    assert stats["splits"]["sft"]["demonstrations_passing"] == 1.0
    assert sum(stats["splits"]["sft"]["kinds"].values()) >= 50
    assert stats["splits"]["pretrain"]["text_words"] > 20


# ---- users' own data --------------------------------------------------------------------------------

def write_lines(tmp_path, *lines) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_user_formats_are_normalized(tmp_path):
    path = write_lines(
        tmp_path,
        '{"prompt": "Describe bees.", "response": "Bees make honey."}',
        "",
        '{"id": "c1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},'
        ' {"role": "assistant", "content": "Hello."}]}',
        '{"prompt": "Only a prompt.", "constraints": [{"kind": "lowercase", "args": {}}]}')
    first, chat, prompt_only = load_examples(path)
    assert first["messages"] == [{"role": "user", "content": "Describe bees."}] and first["response"] == "Bees make honey."
    assert first["id"] == "data.jsonl:1"
    assert chat["id"] == "c1" and chat["prompt"] == "Hi?" and chat["response"] == "Hello."
    assert [m["role"] for m in chat["messages"]] == ["system", "user"]
    assert "response" not in prompt_only and prompt_only["constraints"][0]["kind"] == "lowercase"


@pytest.mark.parametrize("line,field,message", [
    ('{"prompt": "Hi", "response": ', None, "not valid JSON"),
    ('["prompt"]', None, "JSON object"),
    ('{"text": "no prompt"}', "prompt", "missing"),
    ('{"prompt": 3, "response": "x"}', "prompt", "non-empty string"),
    ('{"prompt": "Hi", "response": ["x"]}', "response", "non-empty string"),
    ('{"messages": "hi"}', "messages", "non-empty list"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "messages[0].role", "last message"),
    ('{"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}',
     "messages[0].role", "robot"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "messages[0].content", "missing"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}', "messages",
     "user message"),
    ('{"prompt": "Hi", "constraints": [{"kind": "shouting"}]}', "constraints[0].kind", "shouting"),
    ('{"prompt": "Hi", "constraints": [{"kind": "word_count", "args": {"n": 3}}]}', "constraints[0].args", "relation"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, message):
    path = write_lines(tmp_path, '{"prompt": "A good line.", "response": "Fine."}', line)
    with pytest.raises(InputError) as caught:
        load_examples(path)
    assert caught.value.path == path and caught.value.line == 2 and caught.value.field == field
    assert message in str(caught.value)


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_examples(str(tmp_path / "absent.jsonl"))
    with pytest.raises(InputError, match="no examples"):
        load_examples(write_lines(tmp_path, ""))
    with pytest.raises(InputError, match="unknown split"):
        load_examples("instrugo:train")


# ---- the CLI -------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_validate(tmp_path):
    good = write_lines(tmp_path, '{"prompt": "Describe bees.", "response": "Bees make honey."}')
    result = runner.invoke(app, ["validate", good])
    assert result.exit_code == 0 and "1 examples OK" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:2: field 'messages[0].role'" in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_stats(tmp_path):
    path = write_lines(tmp_path, '{"prompt": "Describe bees.", "response": "Bees make honey.",'
                                 ' "constraints": [{"kind": "no_commas", "args": {}}]}')
    result = runner.invoke(app, ["stats", "instrugo:eval_unseen", path])
    assert result.exit_code == 0, result.output
    assert "instrugo:eval_unseen (eval_unseen)" in result.output and "kind: two_responses" in result.output
    assert "demonstrations passing the judge" in result.output and "1.000" in result.output


def test_cli_export(tmp_path):
    out = tmp_path / "sft_chat.jsonl"
    result = runner.invoke(app, ["export", "sft", "--out", str(out), "--format", "chat"])
    assert result.exit_code == 0, result.output
    exported = load_examples(str(out))  # the chat export reads back as valid user data
    assert len(exported) == len(load_split("sft")) and exported[0]["response"] == load_split("sft")[0]["response"]
    out = tmp_path / "eval.jsonl"
    assert runner.invoke(app, ["export", "instrugo:eval", "--out", str(out)]).exit_code == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()][:2] == ["eval-000001", "eval-000002"]
    result = runner.invoke(app, ["export", "rm", "--out", str(tmp_path / "rm.jsonl"), "--format", "chat"])
    assert result.exit_code == 1 and "no responses" in result.output

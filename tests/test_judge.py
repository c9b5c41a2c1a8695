"""The gold judge: every constraint verifier on hand-written responses, then the gold score's properties."""

import time

import pytest

from instrugo.judge import CONSTRAINT_KINDS, check_constraint, compatible, gold_judge
from instrugo.judge.text import paragraphs, sentences, words

BEES = "Honeybees live in large colonies. Each colony has a single queen that lays the eggs."

# kind -> (args, responses that pass, responses that fail); all written by hand.
CASES = {
    "lowercase": ({}, ["honeybees live in colonies.", "bees, wax & honey: 3 things!"],
                  ["Honeybees live in colonies.", "honeybees live in the USA.", "123 ..."]),
    "uppercase": ({}, ["HONEYBEES LIVE IN COLONIES.", "BEES MAKE 2 KINDS OF WAX!"],
                  ["HONEYBEES live in colonies.", "Bees.", "!!!"]),
    "capital_words": ({"n": 2}, ["Bees are VERY busy and REALLY small.", "The QUEEN lays EGGS all DAY."],
                      ["Only ONE word is loud here.", "I am a bee.", "A B C are single letters."]),
    "word_count": ({"relation": "at least", "n": 5}, ["one two three four five", "Bees make honey from nectar."],
                   ["Bees make honey.", "Bees, bees, bees!"]),
    "sentence_count": ({"relation": "exactly", "n": 2}, [BEES, "Bees fly! Do they sting?"],
                       ["Bees fly.", "Bees fly. Bees sting. Bees dance."]),
    "paragraph_count": ({"n": 2}, ["Bees live in hives.\n\nThey make honey.", "First part.\n   \nSecond part."],
                        ["Bees live in hives.\nThey make honey.", "One.\n\nTwo.\n\nThree."]),
    "bullet_list": ({"n": 3}, ["* bees\n* wax\n* honey", "Facts:\n- bees live in hives\n- they dance\n- they sting"],
                    ["* bees\n* wax", "* bees\n* wax\n* honey\n* pollen", "1. bees\n2. wax\n3. honey"]),
    "numbered_list": ({"n": 2}, ["1. Bees make honey.\n2. Bees make wax.", "Here:\n1) first\n2) second"],
                      ["1. Bees make honey.", "* bees\n* wax", "1. a\n2. b\n3. c"]),
    "sections": ({"n": 2, "marker": "Section"},
                 ["Section 1\nBees live in hives.\n\nSection 2\nThey make honey.",
                  "SECTION 1 Bees live in hives.\nSECTION 2 They make honey."],
                 ["Section 1\nBees live in hives.", "Section 1\nBees.\nSection 3\nHoney.",
                  "Section 1\nBees.\nSection 2\n"]),
    "two_responses": ({}, ["Bees make honey.\n******\nBees make wax.", "One answer ****** Another answer"],
                      ["Bees make honey.", "Bees make honey. ****** Bees make honey.", "A ****** B ****** C"]),
    "json_format": ({}, ['{"answer": "Bees make honey."}', '```json\n{"facts": ["bees", "wax"]}\n```', "[1, 2]"],
                    ['{"answer": "Bees make honey."', "Bees make honey.", '"just a string"']),
    "include_keywords": ({"keywords": ["queen", "wax"]}, ["The QUEEN lives among wax cells.", "Wax. Queen."],
                         ["The queen lays eggs.", "The queens use waxy cells."]),
    "forbidden_words": ({"words": ["honey"]}, ["Bees make a sweet food.", "Honeybees live in hives."],
                        ["Bees make honey.", "HONEY is sweet."]),
    "keyword_frequency": ({"keyword": "bee", "n": 2}, ["A bee meets another bee.", "Bee! BEE!"],
                          ["A bee meets other bees.", "Honeybees and beehives."]),
    "start_phrase": ({"phrase": "Happy to help."}, ["Happy to help. Bees make honey.", "  happy to help. bees."],
                     ["Bees make honey. Happy to help.", "Happy to help bees."]),
    "end_phrase": ({"phrase": "Hope this helps."}, ["Bees make honey. Hope this helps.", "BEES. HOPE THIS HELPS.\n"],
                   ["Hope this helps. Bees make honey.", "Bees make honey. Hope this helps!"]),
    "end_question": ({}, ["Bees make honey. Do you like honey?", "Why do bees dance?  "],
                     ["Do you like honey? Bees make it.", "Bees make honey."]),
    "quotation": ({}, ['"Bees make honey."', "\u201cBees make honey.\u201d"],
                  ['Bees make "honey".', '"Bees make honey.', '"']),
    "title": ({}, ["<<All About Bees>>\nBees make honey.", "Bees make honey. <<bees>>"],
              ["All About Bees\nBees make honey.", "<All About Bees> Bees.", "<<>> Bees make honey."]),
    "no_commas": ({}, ["Bees make honey and wax.", "Bees; wax: honey."],
                  ["Bees make honey, wax, and royal jelly.", "Bees make honey."[:-1] + ","]),
    "postscript": ({"marker": "P.S."}, ["Bees make honey.\n\nP.S. I love bees.", "Bees.\np.s. wax too"],
                   ["Bees make honey. P.S. I love bees.", "Bees.\nP.P.S. wax too", "Bees.\nP.S."]),
    "placeholders": ({"n": 2}, ["Write to [name] at [address].", "Visit [website] on [date]."],
                     ["Write to [name] at the hive.", "Write to (name) at {address}.", "Write to [] at []."]),
    "highlights": ({"n": 2}, ["Bees make *honey* and *wax*.", "*Bees* live in **hives**."],
                   ["Bees make *honey* and wax.", "* Bees\n* wax", "Bees make honey."]),
    "sentence_length": ({"n": 5}, ["Bees make honey. They also make wax.", "Short one.\nAnother short one."],
                        ["Bees make honey from the nectar of flowers.", "", "..."]),
    "answer_options": ({"options": ["My answer is yes.", "My answer is no.", "My answer is maybe."]},
                       ["My answer is yes. Bees make honey.", "my answer is no."],
                       ["Yes. Bees make honey.", "Bees make honey. My answer is yes."]),
}


def test_there_are_at_least_20_kinds_and_each_has_hand_written_cases():
    assert len(CONSTRAINT_KINDS) >= 20
    assert set(CASES) == set(CONSTRAINT_KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_verifier_accepts_passing_and_rejects_failing_responses(kind):
    args, passing, failing = CASES[kind]
    constraint = {"kind": kind, "args": args}
    for response in passing:
        assert check_constraint(constraint, response), f"{kind} should pass: {response!r}"
    for response in failing:
        assert not check_constraint(constraint, response), f"{kind} should fail: {response!r}"


def test_relations_of_counting_kinds():
    text = "Bees make honey. They dance. They sting."
    assert check_constraint({"kind": "sentence_count", "args": {"relation": "at least", "n": 3}}, text)
    assert not check_constraint({"kind": "sentence_count", "args": {"relation": "at least", "n": 4}}, text)
    assert check_constraint({"kind": "sentence_count", "args": {"relation": "at most", "n": 3}}, text)
    assert not check_constraint({"kind": "sentence_count", "args": {"relation": "at most", "n": 2}}, text)
    assert check_constraint({"kind": "word_count", "args": {"relation": "at most", "n": 7}}, text)
    assert not check_constraint({"kind": "word_count", "args": {"relation": "at most", "n": 6}}, text)


def test_postscript_markers_are_distinct():
    pps = {"kind": "postscript", "args": {"marker": "P.P.S."}}
    assert check_constraint(pps, "Bees.\n\nP.P.S. More bees.")
    assert check_constraint(pps, "Bees.\n\np. p. s. more bees.")
    assert not check_constraint(pps, "Bees.\n\nP.S. More bees.")


def test_text_units():
    assert words("Don't stop: 3 bees' wings!") == ["Don't", "stop", "3", "bees", "wings"]
    assert sentences("One. Two!\n* three\n\n***") == ["One.", "Two!", "* three"]
    assert paragraphs("a b\n\n\n c \n\n***") == ["a b", "c"]


def test_conflicts_are_symmetric_and_name_real_kinds():
    for name, kind in CONSTRAINT_KINDS.items():
        assert kind.conflicts <= set(CONSTRAINT_KINDS), name
        for other in kind.conflicts:
            assert not compatible(other, name)
    assert not compatible("lowercase", "uppercase") and compatible("lowercase", "title")


# ---- the gold score ------------------------------------------------------------------------------------

UPPER = {"topic": "honeybees", "prompt": "Tell me about honeybees. Answer in all caps.",
         "constraints": [{"kind": "uppercase", "args": {}}]}
GOOD_UPPER = ("HONEYBEES LIVE IN LARGE COLONIES THAT CAN HOLD TENS OF THOUSANDS OF INSECTS. "
              "WORKER BEES GATHER NECTAR AND POLLEN, AND THE QUEEN LAYS NEARLY ALL OF THE EGGS.")
GOOD_LOWER_CASE_MIX = ("Honeybees live in large colonies that can hold tens of thousands of insects. "
                       "Worker bees gather nectar and pollen, and the queen lays nearly all of the eggs.")


def test_nonsense_that_satisfies_a_constraint_scores_far_below_a_real_answer():
    nonsense = gold_judge(UPPER, "AAAA AAAA")
    real = gold_judge(UPPER, GOOD_UPPER)
    assert nonsense.all_passed and real.all_passed
    assert real.score > 0.9 and nonsense.score < 0.1
    assert "gibberish" in nonsense.reasons


def test_breaking_the_constraint_costs_more_than_anything_but_quality():
    broken = gold_judge(UPPER, GOOD_LOWER_CASE_MIX)
    assert not broken.all_passed and broken.quality == 1.0 and broken.topicality > 0.8
    assert 0.3 < broken.score < gold_judge(UPPER, GOOD_UPPER).score - 0.5
    assert "fails uppercase" in broken.reasons


def test_empty_scores_zero():
    verdict = gold_judge(UPPER, "")
    assert verdict.score == 0 and verdict.n_words == 0 and "empty" in verdict.reasons


@pytest.mark.parametrize("response,reason", [
    ("HONEYBEES " * 30, "repetitive"),
    ("THE QUEEN LAYS EGGS. " * 8, "repetitive"),
    ("BEES BEES BEES. HONEY HONEY HONEY. HIVE HIVE HIVE. QUEEN QUEEN QUEEN.", "repetitive"),
    ("BEES ARE GOOD.\nBEES ARE GOOD.\nBEES ARE GOOD.\nBEES ARE GOOD.", "repetitive"),
    ("XKQJ ZPTWR BLORFH QQQZ HHHK VRRRT MNBVCX QWRTY", "gibberish"),
    ("HONEYBEES.", "very short"),
])
def test_degenerate_responses_score_low(response, reason):
    verdict = gold_judge(UPPER, response)
    assert reason in verdict.reasons
    assert verdict.score < 0.4 < gold_judge(UPPER, GOOD_UPPER).score


def test_off_topic_answer_scores_below_on_topic_answer():
    off = gold_judge(UPPER, "THE STOCK MARKET ROSE TODAY AS INVESTORS BOUGHT SHARES OF LARGE TECHNOLOGY COMPANIES.")
    assert off.topicality < 0.3 and "off topic" in off.reasons
    assert off.score < gold_judge(UPPER, GOOD_UPPER).score - 0.15


def test_fluent_answer_in_its_own_words_is_on_topic():
    example = {"topic": "honeybees", "prompt": "Tell me about honeybees.", "constraints": []}
    verdict = gold_judge(example, "Honeybees are fascinating creatures that communicate through intricate "
                                  "dances, coordinating foraging trips across sunny meadows and orchards.")
    assert verdict.quality == 1.0 and verdict.topicality > 0.6 and verdict.score > 0.9


def test_topicality_ignores_case_and_works_without_a_known_topic():
    assert gold_judge(UPPER, GOOD_UPPER).topicality == gold_judge(UPPER, GOOD_LOWER_CASE_MIX).topicality
    user = {"prompt": "Explain how volcanoes erupt."}
    on = gold_judge(user, "Volcanoes erupt when magma rises and pressure builds under the crust.")
    off = gold_judge(user, "My favourite recipe uses butter, sugar and flour for a simple cake.")
    assert on.topicality > off.topicality and on.constraint_fraction == 1.0


def test_partial_constraint_satisfaction_is_graded():
    example = {**UPPER, "constraints": [{"kind": "uppercase", "args": {}}, {"kind": "no_commas", "args": {}}]}
    verdict = gold_judge(example, GOOD_UPPER)  # uppercase but has a comma
    assert verdict.constraint_results == [True, False] and verdict.constraint_fraction == 0.5
    assert gold_judge(UPPER, GOOD_LOWER_CASE_MIX).score < verdict.score < gold_judge(UPPER, GOOD_UPPER).score


def test_judge_is_fast():
    responses = [f"{GOOD_LOWER_CASE_MIX} Variant {i} mentions hive {i * 7} and nectar." for i in range(300)]
    started = time.perf_counter()
    for response in responses:
        gold_judge(UPPER, response)
    per_call = (time.perf_counter() - started) / len(responses)
    assert per_call < 0.002  # ~0.1 ms measured; generous for slow CI machines

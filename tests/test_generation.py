import torch

from instrugo.generation import SamplingConfig, left_pad, sample_responses, truncate_at_eos
from instrugo.models import load_causal_lm

EOS, PAD = 2, 0


def test_truncate_at_eos_keeps_first_eos_and_drops_the_rest():
    assert truncate_at_eos([5, 6, EOS, 7, EOS], EOS, PAD) == ([5, 6, EOS], True)


def test_truncate_without_eos_drops_trailing_padding_and_reports_no_eos():
    assert truncate_at_eos([5, 6, PAD, PAD], EOS, PAD) == ([5, 6], False)
    assert truncate_at_eos([5, 6, 7], EOS, PAD) == ([5, 6, 7], False)


def test_left_pad_aligns_sequences_on_the_right():
    ids, mask = left_pad([[1, 2, 3], [4]], PAD)
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_generation_matches_one_prompt_at_a_time(tiny_tokenizer, tiny_model_dir):
    """Left padding with correct position ids: a prompt's greedy output must not depend on its batch."""
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer)
    prompts = ["Name a planet.", "Write a very long sentence about rivers, mountains and the sea.", "Hi"]
    config = SamplingConfig(max_new_tokens=12, temperature=0.0, batch_size=3)
    batched = sample_responses(model, tiny_tokenizer, prompts, config=config)
    single = [sample_responses(model, tiny_tokenizer, [p], config=SamplingConfig(12, 0.0, 1.0, 1))[0] for p in prompts]
    assert [b[0].token_ids for b in batched] == [s[0].token_ids for s in single]


def test_sampling_is_seeded_and_returns_n_per_prompt(tiny_tokenizer, tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer)
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, batch_size=4)
    first = sample_responses(model, tiny_tokenizer, ["a", "b"], n=3, config=config, seed=7)
    second = sample_responses(model, tiny_tokenizer, ["a", "b"], n=3, config=config, seed=7)
    assert [len(r) for r in first] == [3, 3]
    assert [[s.token_ids for s in r] for r in first] == [[s.token_ids for s in r] for r in second]
    for samples in first:
        for s in samples:
            assert s.has_eos == (s.token_ids[-1:] == [tiny_tokenizer.eos_token_id])
            assert 0 < len(s.token_ids) <= 8

import torch

from instrugo.generation import SamplingConfig, decode, left_pad, next_tokens, sample_responses
from instrugo.models import load_causal_lm

EOS, PAD = 2, 0


class CountingModel(torch.nn.Module):
    """A stand-in LM whose next token is the last one + 1, with PAD always the most likely (decode must
    never pick it) and EOS after token 12 or 25: rows starting at 10, 20 and 30 finish after 3 tokens, after
    6 tokens, and never. Checks that every call's inputs stay aligned as finished rows leave the batch."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
        self.vocab, self.calls, self.seen = vocab, [], 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep=0):
        rows, width = input_ids.shape
        assert attention_mask.shape == (rows, self.seen + width) and position_ids.shape == (rows, width)
        self.seen += width
        self.calls.append(rows)
        last = input_ids[:, -1]
        target = torch.where((last == 12) | (last == 25), torch.full_like(last, EOS), last + 1)
        logits = torch.zeros(rows, width, self.vocab)
        logits[:, -1, PAD] = 100.0
        logits[torch.arange(rows), -1, target] = 50.0
        return type("Output", (), {"logits": logits})()


def test_decode_drops_finished_rows_and_keeps_each_rows_tokens():
    model = CountingModel()
    ids, mask = left_pad([[5, 10], [20], [7, 8, 30]], PAD)
    out = decode(model, ids, mask, max_new_tokens=8, temperature=0.0, top_p=1.0, eos_id=EOS, pad_id=PAD,
                 generator=torch.Generator().manual_seed(0))
    assert out == [([11, 12, EOS], True), ([21, 22, 23, 24, 25, EOS], True), ([31, 32, 33, 34, 35, 36, 37, 38], False)]
    # Prefill with 3 rows; the first row leaves after its EOS, the second after its own.
    assert model.calls == [3, 3, 3, 2, 2, 2, 1, 1]


def test_decode_never_samples_the_pad_token():
    model = CountingModel()
    ids, mask = left_pad([[30]], PAD)
    [(tokens, _)] = decode(model, ids, mask, 4, 1.0, 1.0, EOS, PAD, torch.Generator().manual_seed(0))
    assert PAD not in tokens


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    drawn = next_tokens(logits, 1.0, 0.6, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}          # 0.5 < 0.6, so token 1 is needed; 0.8 >= 0.6 stops
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.03   # renormalised within the nucleus
    full = next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs((full == 2).float().mean().item() - 0.2) < 0.03
    assert next_tokens(torch.tensor([[0.1, 3.0, 0.2]]), 0.0, 1.0, torch.Generator()).tolist() == [1]


def test_left_pad_aligns_sequences_on_the_right():
    ids, mask = left_pad([[1, 2, 3], [4]], PAD)
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_decode_matches_transformers_generate(tiny_tokenizer, tiny_model_dir):
    """Our decode loop against `model.generate` on a real (tiny) Llama with left padding."""
    from instrugo.generation import encode_prompts

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    prompts = ["Name a planet.", "Write a very long sentence about rivers, mountains and the sea.", "Hi"]
    ids, mask = left_pad(encode_prompts(tiny_tokenizer, prompts), tiny_tokenizer.pad_token_id)
    ours = decode(model, ids, mask, 12, 0.0, 1.0, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id,
                  torch.Generator())
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                                   suppress_tokens=[tiny_tokenizer.pad_token_id])[:, ids.shape[1]:].tolist()
    for (tokens, has_eos), row in zip(ours, reference):
        assert tokens == row[:len(tokens)]
        assert has_eos == (tokens[-1] == tiny_tokenizer.eos_token_id)
        assert has_eos or len(tokens) == 12


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

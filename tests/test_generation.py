import pytest
import torch

from instrugo.generation import (PreallocatedLayer, SamplingConfig, decode, draw, pad_batch, next_tokens,
                                 positions_skipping_padding, preallocated_cache, sample_responses)
from instrugo.models import inference_attention, load_causal_lm

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
    ids, mask = pad_batch([[5, 10], [20], [7, 8, 30]], PAD)
    out = decode(model, ids, mask, max_new_tokens=8, temperature=0.0, top_p=1.0, eos_id=EOS, pad_id=PAD,
                 generator=torch.Generator().manual_seed(0))
    assert out == [([11, 12, EOS], True, None), ([21, 22, 23, 24, 25, EOS], True, None),
                   ([31, 32, 33, 34, 35, 36, 37, 38], False, None)]  # greedy: no log-probs
    # Prefill with 3 rows; the first row leaves after its EOS, the second after its own.
    assert model.calls == [3, 3, 3, 2, 2, 2, 1, 1]


def test_copies_of_a_prompt_share_its_prompt_pass_and_continue_it_each():
    model = CountingModel()
    ids, mask = pad_batch([[5, 10], [20]], PAD)
    out = decode(model, ids, mask, max_new_tokens=6, temperature=0.0, top_p=1.0, eos_id=EOS, pad_id=PAD,
                 generator=torch.Generator().manual_seed(0), prompt_of_row=torch.tensor([0, 1, 0, 1, 1]))
    first, second = ([11, 12, EOS], True, None), ([21, 22, 23, 24, 25, EOS], True, None)
    assert out == [first, second, first, second, second]
    assert model.calls == [2, 5, 5, 3, 3, 3]  # one prompt pass for 2 prompts, then a row per copy


def prompt_sensitive_model(tiny_tokenizer, tiny_model_dir):
    """The tiny model with larger random weights: at its own initialisation greedy decoding emits the same
    token whatever the prompt, which would hide a row continuing the wrong prompt."""
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def test_shared_prompt_pass_gives_the_tokens_of_separate_ones(tiny_tokenizer, tiny_model_dir):
    from instrugo.generation import encode_prompts

    model = prompt_sensitive_model(tiny_tokenizer, tiny_model_dir)
    encoded = encode_prompts(tiny_tokenizer, ["Name a planet.", "Write a long sentence about rivers."])
    shared, separate = (pad_batch(prompts, tiny_tokenizer.pad_token_id)
                        for prompts in (encoded, [encoded[1], encoded[0], encoded[1]]))
    args = (10, 0.0, 1.0, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, torch.Generator())
    with inference_attention(model):
        out = decode(model, *shared, *args, prompt_of_row=torch.tensor([1, 0, 1]))
        assert out == decode(model, *separate, *args)
    assert out[0] != out[1]  # the two prompts continue differently, so a wrong mapping would show


def test_rows_joining_a_running_decode_continue_as_if_decoded_alone(tiny_tokenizer, tiny_model_dir):
    """Continuous batching: prompts join a decode between steps, wider and narrower than its cache, and
    rows leave; every row's greedy tokens are those it gets decoded alone, and the cache keeps only the
    columns some row still reads."""
    from instrugo.generation import DecodeBatch, encode_prompts

    model = prompt_sensitive_model(tiny_tokenizer, tiny_model_dir)
    pad, length = tiny_tokenizer.pad_token_id, 8
    prompts = encode_prompts(tiny_tokenizer, ["Hi", "Write a long sentence about rivers, hills and the sea.",
                                              "Name a planet.", "Hi"])
    short, wide, narrow, _ = map(len, prompts)
    with inference_attention(model):
        alone = [decode(model, *pad_batch([p], pad), length, 0.0, 1.0, -1, pad, torch.Generator())[0].tokens
                 for p in prompts]
        batch, tokens, owners, logits = DecodeBatch(model), [[] for _ in prompts], [], None

        def join(index: int, leaving: int | None = None, new_tokens: int = length) -> None:
            nonlocal logits, owners
            if leaving is not None:  # a row that has all its tokens leaves first
                kept = torch.tensor([row for row, owner in enumerate(owners) if owner != leaving])
                batch.keep(kept)
                logits, owners = logits[kept], [owners[row] for row in kept.tolist()]
            new = batch.add(*pad_batch([prompts[index]], pad), new_tokens)
            logits, owners = (new if logits is None else torch.cat([logits, new])), owners + [index]

        join(0)
        for step in range(4 * length):
            if step == 3:
                assert wide > batch.attention_mask.shape[1]  # wider than the cache so far: the others move right
                join(1)
            if step == length:  # the first row is done: it leaves, a narrower prompt joins right-aligned
                join(2, leaving=0)
                assert batch.attention_mask.shape[1] == wide + length - 3
            if step == length + 3:  # the widest row leaves: the columns only it read go with it; the row that
                join(3, leaving=1, new_tokens=2)  # joins wants 2 tokens, but the room others need is kept
                assert batch.attention_mask.shape[1] == max(narrow + 3, short) < wide + length
            token = next_tokens(logits, 0.0, 1.0, None, banned=pad)[0]
            wanted = [length, length, length, 2]
            for owner, value in zip(owners, token.tolist()):
                if len(tokens[owner]) < wanted[owner]:
                    tokens[owner].append(value)
            if [len(t) for t in tokens] == wanted:
                break
            logits = batch.forward(token)
    assert tokens == alone[:3] + [alone[3][:2]]
    assert len(set(map(tuple, alone[:3]))) == 3  # the prompts continue differently: a misplaced row would show


def test_copies_of_a_prompt_split_across_batches_each_continue_it(tiny_tokenizer, tiny_model_dir):
    model = prompt_sensitive_model(tiny_tokenizer, tiny_model_dir)
    prompts = ["Name a planet.", "Write a long sentence about rivers.", "Hi"]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0, batch_size=1)
    alone = [r[0].token_ids for r in sample_responses(model, tiny_tokenizer, prompts, config=greedy)]
    copies = sample_responses(model, tiny_tokenizer, prompts, n=2, config=SamplingConfig(8, 0.0, 1.0, 3))
    assert [[s.token_ids for s in r] for r in copies] == [[a, a] for a in alone]
    assert len(set(map(tuple, alone))) == 3


def test_decode_never_samples_the_pad_token_but_keeps_it_in_the_logprobs():
    """The model puts almost all its mass on PAD (logit 100, the next token 50): the draw skips PAD, and the
    log-prob of what was drawn is the full softmax's, ~ -50, as a forward pass over the response gives it."""
    model = CountingModel()
    ids, mask = pad_batch([[30]], PAD)
    [(tokens, _, logprobs)] = decode(model, ids, mask, 4, 1.0, 1.0, EOS, PAD, torch.Generator().manual_seed(0))
    assert PAD not in tokens
    assert logprobs == pytest.approx([-50.0] * len(tokens), abs=1e-3)


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    drawn, _ = next_tokens(logits, 1.0, 0.6, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}          # 0.5 < 0.6, so token 1 is needed; 0.8 >= 0.6 stops
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.03   # renormalised within the nucleus
    full, _ = next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs((full == 2).float().mean().item() - 0.2) < 0.03
    assert next_tokens(torch.tensor([[0.1, 3.0, 0.2]]), 0.0, 1.0, torch.Generator())[0].tolist() == [1]


def test_drawn_tokens_come_with_their_full_softmax_logprobs_at_the_temperature():
    """A banned token is never drawn and the others keep their proportions, but the log-probs returned are
    those of softmax(logits / T) over the whole vocabulary: what a forward pass over the response gives."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    drawn, logprobs = next_tokens(logits, 0.5, 1.0, torch.Generator().manual_seed(0), banned=0)
    assert set(drawn.tolist()) == {1, 2}
    assert abs((drawn == 1).float().mean().item() - 0.09 / 0.13) < 0.03   # 0.3² : 0.2² at T = 0.5
    expected = torch.log_softmax(logits[0] / 0.5, -1)                       # 0.25, 0.09, 0.04 over 0.38
    torch.testing.assert_close(logprobs, expected[drawn])
    nucleus, nucleus_logprobs = next_tokens(logits, 1.0, 0.55, torch.Generator().manual_seed(0), banned=0)
    assert set(nucleus.tolist()) == {1}          # of what can be drawn, token 1 holds 0.6 >= 0.55
    torch.testing.assert_close(nucleus_logprobs, torch.log(torch.tensor(0.3)).expand(4000))  # before the cut
    greedy, none = next_tokens(logits[:1], 0.0, 1.0, torch.Generator(), banned=0)
    assert greedy.tolist() == [1] and none is None


def test_draw_follows_the_weights_and_never_picks_a_zero_weight():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).repeat(8000, 1)
    drawn = draw(weights, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3}
    assert abs((drawn == 3).float().mean().item() - 0.75) < 0.02
    one_hot = torch.zeros(4, 5)
    one_hot[torch.arange(4), torch.tensor([0, 4, 2, 0])] = 1.0  # the first and last entries are reachable
    assert draw(one_hot, torch.Generator().manual_seed(1)).tolist() == [0, 4, 2, 0]


def test_preallocated_layer_matches_concatenation_and_keeps_selected_rows():
    layer = PreallocatedLayer(capacity=6)
    first, second, third = (torch.randn(3, 2, width, 4) for width in (3, 1, 1))
    layer.update(first, first + 1)
    keys, values = layer.update(second, second + 1)
    assert torch.equal(keys, torch.cat([first, second], dim=2)) and torch.equal(values, keys + 1)
    assert layer.get_seq_length() == 4
    layer.batch_select_indices(torch.tensor([2, 0]))
    keys, _ = layer.update(third[:2], third[:2] + 1)
    assert torch.equal(keys, torch.cat([torch.cat([first, second], dim=2)[[2, 0]], third[:2]], dim=2))


def test_a_step_on_the_preallocated_cache_matches_a_full_forward_pass(tiny_tokenizer, tiny_model_dir):
    """Prefill, then one cached step (left padding; the tiny model has 4 query heads sharing 2 key/value
    heads): the step's logits equal a forward pass over the whole sequence."""
    from instrugo.generation import encode_prompts

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    ids, mask = pad_batch(encode_prompts(tiny_tokenizer, ["Name a planet.", "Hi"]), tiny_tokenizer.pad_token_id)
    next_token = torch.tensor([[500], [600]])
    full_ids, full_mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = model(input_ids=full_ids, attention_mask=full_mask,
                         position_ids=positions_skipping_padding(full_mask)).logits[:, -1]
        with inference_attention(model):
            cache = preallocated_cache(model.config, ids.shape[1] + 4)
            model(input_ids=ids, attention_mask=mask, position_ids=positions_skipping_padding(mask),
                  past_key_values=cache, use_cache=True)
            step = model(input_ids=next_token, attention_mask=full_mask,
                         position_ids=positions_skipping_padding(full_mask)[:, -1:], past_key_values=cache,
                         use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, expected, atol=1e-4, rtol=1e-4)


def test_under_autocast_the_cache_stores_keys_in_bf16_and_gives_the_same_logits(tiny_tokenizer, tiny_model_dir):
    """Keys reach the cache in fp32 (rotary embeddings); stored in bf16 they must give exactly the logits of
    transformers' own cache, which keeps them in fp32 and lets attention cast them at every step."""
    from transformers import DynamicCache

    from instrugo.generation import encode_prompts
    from instrugo.models import autocast

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    ids, mask = pad_batch(encode_prompts(tiny_tokenizer, ["Name a planet.", "Hi"]), tiny_tokenizer.pad_token_id)
    steps = torch.tensor([[500, 501, 502], [600, 601, 602]])

    def logits_of_each_step(cache):
        step_mask, outputs = mask, []
        positions = positions_skipping_padding(mask)
        outputs.append(model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True).logits[:, -1])
        for column in range(steps.shape[1]):
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            outputs.append(model(input_ids=steps[:, column:column + 1], attention_mask=step_mask,
                                 position_ids=positions_skipping_padding(step_mask)[:, -1:], past_key_values=cache,
                                 use_cache=True).logits[:, -1])
        return torch.stack(outputs)

    with torch.no_grad(), autocast("bf16"), inference_attention(model):
        ours = preallocated_cache(model.config, ids.shape[1] + steps.shape[1])
        stored = logits_of_each_step(ours)
        recast = logits_of_each_step(DynamicCache(config=model.config))
    assert ours.layers[0].key_buffer.dtype == ours.layers[0].value_buffer.dtype == torch.bfloat16
    assert torch.equal(stored, recast)


def test_a_prompt_pass_in_groups_of_rows_gives_the_cache_and_logits_of_one_pass(tiny_tokenizer, tiny_model_dir):
    """Groups cut to their own longest prompt must place keys and values where one pass over all rows
    puts them: the next decode step, which reads the whole cache, checks every column."""
    from instrugo.generation import encode_prompts, prompt_pass
    from instrugo.models import autocast

    model = prompt_sensitive_model(tiny_tokenizer, tiny_model_dir)
    prompts = ["Hi", "Name a planet.", "Name a red planet.", "Write a long sentence about rivers.",
               "Write a very long sentence about rivers, mountains and the sea."]
    ids, mask = pad_batch(sorted(encode_prompts(tiny_tokenizer, prompts), key=len), tiny_tokenizer.pad_token_id)
    step = torch.tensor([[500], [501], [502], [503], [504]])
    step_mask = torch.cat([mask, torch.ones(5, 1, dtype=torch.long)], 1)
    step_positions = positions_skipping_padding(step_mask)[:, -1:]
    widths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    results = []
    with torch.no_grad(), inference_attention(model):
        # One pass; then groups of 2, 2 and 1 rows, the first two narrower than the batch.
        for rows_per_pass in (5, 2):
            cache, logits = prompt_pass(model, ids, mask, ids.shape[1] + 1, rows_per_pass)
            after = model(input_ids=step, attention_mask=step_mask, position_ids=step_positions,
                          past_key_values=cache, use_cache=True).logits[:, -1]
            results.append((logits, after))
        with autocast("bf16"):
            bf16_cache, _ = prompt_pass(model, ids, mask, ids.shape[1] + 1, 2)
    (one_logits, one_after), (grouped_logits, grouped_after) = results
    torch.testing.assert_close(grouped_logits, one_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grouped_after, one_after, atol=1e-4, rtol=1e-4)
    grouped_widths = widths[2:5]  # after the one pass and its step
    assert [rows for rows, _ in grouped_widths] == [2, 2, 1]
    assert grouped_widths[0][1] < grouped_widths[1][1] < ids.shape[1] == grouped_widths[2][1]
    assert bf16_cache.layers[0].key_buffer.dtype == torch.bfloat16


def test_decode_with_prompt_passes_in_groups_gives_the_tokens_of_one_pass(tiny_tokenizer, tiny_model_dir,
                                                                         monkeypatch):
    """`decode` as sampling calls it, with copies of prompts (prompt_of_row) and more distinct prompts
    than PROMPT_PASS_ROWS."""
    from instrugo import generation
    from instrugo.generation import encode_prompts

    model = prompt_sensitive_model(tiny_tokenizer, tiny_model_dir)
    prompts = ["Hi", "Name a planet.", "Name a red planet.", "Write a long sentence about rivers."]
    ids, mask = pad_batch(sorted(encode_prompts(tiny_tokenizer, prompts), key=len), tiny_tokenizer.pad_token_id)
    args = (10, 0.0, 1.0, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, torch.Generator())
    copies = torch.tensor([3, 0, 2, 1, 3, 0])
    outputs = []
    with inference_attention(model):
        for rows in (100, 1):
            monkeypatch.setattr(generation, "PROMPT_PASS_ROWS", rows)
            outputs.append((decode(model, ids, mask, *args), decode(model, ids, mask, *args, prompt_of_row=copies)))
    assert outputs[1] == outputs[0]
    alone, copied = outputs[0]
    assert copied == [alone[i] for i in copies.tolist()] and len(set(map(str, alone))) == 4


def test_pad_batch_pads_on_the_side_asked():
    ids, mask = pad_batch([[1, 2, 3], [4]], PAD)
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], PAD, "right")
    assert ids.tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_greedy_decode_matches_transformers_generate(tiny_tokenizer, tiny_model_dir):
    """Our decode loop against `model.generate` on a real (tiny) Llama with left padding."""
    from instrugo.generation import encode_prompts

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    prompts = ["Name a planet.", "Write a very long sentence about rivers, mountains and the sea.", "Hi"]
    ids, mask = pad_batch(encode_prompts(tiny_tokenizer, prompts), tiny_tokenizer.pad_token_id)
    with inference_attention(model):
        ours = decode(model, ids, mask, 12, 0.0, 1.0, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id,
                      torch.Generator())
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                                   suppress_tokens=[tiny_tokenizer.pad_token_id])[:, ids.shape[1]:].tolist()
    for (tokens, has_eos, _), row in zip(ours, reference):
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


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_packed_linears_give_the_same_logits_and_restore_the_layers(tiny_tokenizer, tiny_model_dir, precision):
    from instrugo.models import autocast, onednn_has_bf16, packed_linears

    if not torch.backends.mkldnn.is_available() or (precision == "bf16" and not onednn_has_bf16()):
        pytest.skip(f"packed_linears is a no-op in {precision} without oneDNN{' bf16' * (precision == 'bf16')}")

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    ids = torch.randint(100, 1000, (3, 9))
    with torch.no_grad(), autocast(precision):
        expected = model(input_ids=ids).logits
        with packed_linears(model, precision):
            assert all("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
            packed = model(input_ids=ids).logits
    assert not any("forward" in vars(m) for m in model.modules())
    assert packed.dtype == expected.dtype
    tolerance = 1e-3 if precision == "bf16" else 1e-5
    torch.testing.assert_close(packed.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("packed_before_failing", [0, 5])
def test_packed_linears_fall_back_to_plain_layers_where_onednn_cannot_pack(tiny_tokenizer, tiny_model_dir,
                                                                            monkeypatch, packed_before_failing):
    """Packing fails at the first layer, or after five layers were packed and patched: either way every
    layer runs its plain forward inside the block."""
    from instrugo.models import packed_linears

    if not torch.backends.mkldnn.is_available():
        pytest.skip("packed_linears is a no-op without oneDNN")
    pack = torch.ops.mkldnn._reorder_linear_weight
    calls = []

    def packs_then_fails(weight, rows):
        calls.append(weight.shape)
        if len(calls) > packed_before_failing:
            raise RuntimeError("no such kernel on this CPU")
        return pack(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", packs_then_fails)
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    ids = torch.randint(100, 1000, (3, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with packed_linears(model, "fp32"):
            assert not any("forward" in vars(m) for m in model.modules())
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
    assert len(calls) == packed_before_failing + 1


def test_inference_attention_gives_eager_attentions_logits_and_restores_the_model(tiny_tokenizer, tiny_model_dir):
    """The grouped-head kernel against eager attention (the tiny model groups 4 query heads on 2 key/value
    heads) on every mask it meets: left padding, none (a purely causal block, which transformers passes as no
    mask), and a continuation of a cache whose prompt rows are padded (the reward model's shared prompt pass)."""
    from transformers import DynamicCache

    from instrugo.generation import encode_prompts
    from instrugo.models import GROUPED_ATTENTION, inference_attention

    model = prompt_sensitive_model(tiny_tokenizer, tiny_model_dir)
    model.set_attn_implementation("eager")
    padded = pad_batch(encode_prompts(tiny_tokenizer, ["Name a planet.", "Hi"]), tiny_tokenizer.pad_token_id)
    unpadded = pad_batch(encode_prompts(tiny_tokenizer, ["Name a planet.", "Name a moon."]), tiny_tokenizer.pad_token_id)
    assert bool(unpadded[1].all())
    continuation = torch.tensor([[500, 501, 502], [600, 601, tiny_tokenizer.pad_token_id]])
    continuation_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])

    def passes():
        outputs = []
        for ids, mask in (padded, unpadded):
            outputs.append(model(input_ids=ids, attention_mask=mask, position_ids=positions_skipping_padding(mask)).logits)
        ids, mask = padded
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, position_ids=positions_skipping_padding(mask), past_key_values=cache)
        full_mask = torch.cat([mask, continuation_mask], 1)
        outputs.append(model(input_ids=continuation, attention_mask=full_mask, past_key_values=cache,
                             position_ids=positions_skipping_padding(full_mask)[:, -3:]).logits)
        return outputs

    with torch.no_grad():
        eager = passes()
        with inference_attention(model, model):
            assert model.config._attn_implementation == GROUPED_ATTENTION
            grouped = passes()
    assert model.config._attn_implementation == "eager"
    for expected, ours, mask in zip(eager, grouped, (padded[1], unpadded[1], continuation_mask)):
        real = mask.bool()  # padded positions' outputs are never read
        torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)

"""PPO pieces that decide success (N implementation details) and a tiny end-to-end PPO / PPO-ptx run."""

import torch

from instrugo.generation import left_pad
from instrugo.models import load_causal_lm
from instrugo.ppo import EMA, policy_logprobs, sequence_inputs


def test_position_ids_skip_left_padding():
    query, query_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    response = torch.tensor([[9, 2], [10, 0]])
    response_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    inputs = sequence_inputs(query, query_mask, response, response_mask)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 9, 2], [0, 0, 8, 10, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 1]]


def test_batched_logprobs_with_padding_equal_unpadded_ones(tiny_model_dir, tiny_tokenizer):
    """The same episode must get the same log-probs whatever else is in its batch."""
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    prompts = [[11, 12, 13, 14, 15], [21, 22]]
    responses = [[31, 32, 2], [41]]
    query, query_mask = left_pad(prompts, tiny_tokenizer.pad_token_id)
    response = torch.tensor([[31, 32, 2], [41, 0, 0]])
    response_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    with torch.no_grad():
        batched = policy_logprobs(model, sequence_inputs(query, query_mask, response, response_mask), response, 0.7)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            q, qm = left_pad([p], 0)
            alone = policy_logprobs(model, sequence_inputs(q, qm, torch.tensor([r]), torch.ones(1, len(r))),
                                    torch.tensor([r]), 0.7)
            torch.testing.assert_close(batched[row, :len(r)], alone[0], rtol=1e-4, atol=1e-5)


def test_logprobs_use_the_sampling_temperature(tiny_model_dir, tiny_tokenizer):
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    query, query_mask = left_pad([[11, 12, 13]], 0)
    response = torch.tensor([[31, 32]])
    inputs = sequence_inputs(query, query_mask, response, torch.ones(1, 2))
    with torch.no_grad():
        logits = model(**inputs).logits[0, 2:4] / 0.5
        expected = torch.log_softmax(logits, -1)[torch.arange(2), response[0]]
        torch.testing.assert_close(policy_logprobs(model, inputs, response, 0.5)[0], expected, rtol=1e-4, atol=1e-5)


def test_ema_moves_towards_the_weights_by_one_minus_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))

"""SFT on a tiny model: the response-only mask, the checkpoint plain transformers loads, and resume."""

import json

import pytest
import torch

from instrugo import runio
from instrugo.sft import SFTConfig, run_sft, tokenize_example


def write_demonstrations(path, n=12):
    rows = [{"prompt": f"Say the word number {i} in lowercase.", "response": f"the word is item{i} in lowercase."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_mask_covers_exactly_the_response_and_its_eos(tiny_tokenizer):
    ids, mask = tokenize_example(tiny_tokenizer, [{"role": "user", "content": "Hi there"}], "hello world", 128)
    response_ids = tiny_tokenizer("hello world", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert ids[-len(response_ids):] == response_ids
    assert mask == [0] * (len(ids) - len(response_ids)) + [1] * len(response_ids)


def test_overlong_responses_are_cut_and_overlong_prompts_skipped(tiny_tokenizer):
    ids, mask = tokenize_example(tiny_tokenizer, [{"role": "user", "content": "Hi"}], "word " * 200, 64)
    assert len(ids) == 64 and mask[-1] == 1
    assert tokenize_example(tiny_tokenizer, [{"role": "user", "content": "long " * 100}], "x", 64) is None


def tiny_config(tmp_path, data, **overrides):
    values = dict(model="tiny", data=str(data), out=str(tmp_path / "sft"), epochs=3.0, lr=1e-2, batch_size=4,
                  micro_batch_size=2, max_length=96, save_every=2, precision="fp32")
    values.update(overrides)
    return SFTConfig(**values)


def test_tiny_sft_learns_and_writes_a_plain_transformers_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_demonstrations(tmp_path / "demos.jsonl")
    out = run_sft(tiny_config(tmp_path, data))
    rows = runio.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 10))  # 12 examples / 4 per step x 3 epochs
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.8
    assert runio.is_complete(out) and not (out / "checkpoint").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_killed_sft_resumes_to_the_same_weights(tmp_path, kill_at_step):
    from transformers import AutoModelForCausalLM

    data = write_demonstrations(tmp_path / "demos.jsonl")
    reference = run_sft(tiny_config(tmp_path / "a", data))

    kill_at_step(5)
    config = tiny_config(tmp_path / "b", data)
    with pytest.raises(KeyboardInterrupt):
        run_sft(config)
    assert (tmp_path / "b" / "sft" / "checkpoint").exists() and not runio.is_complete(tmp_path / "b" / "sft")
    kill_at_step.heal()
    resumed = run_sft(config)

    steps = [r["step"] for r in runio.read_metrics(resumed / "metrics.jsonl")]
    assert steps == list(range(1, 10))
    a = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_resuming_with_other_settings_is_refused_naming_the_field(tmp_path, kill_at_step):
    import dataclasses

    from instrugo.runio import InputError

    data = write_demonstrations(tmp_path / "demos.jsonl")
    config = tiny_config(tmp_path / "b", data)
    kill_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        run_sft(config)
    kill_at_step.heal()
    with pytest.raises(InputError, match="lr=") as error:
        run_sft(dataclasses.replace(config, lr=config.lr * 2))
    assert "sft_config.json" in str(error.value) and "lr" in str(error.value)
    assert (tmp_path / "b" / "sft" / "checkpoint").exists()  # nothing was overwritten
    resumed = run_sft(dataclasses.replace(config, save_every=1))  # a bookkeeping setting may change
    assert runio.is_complete(resumed)


def test_left_padded_loss_on_kept_logits_equals_full_loss(tiny_tokenizer):
    """SFT pads on the left and runs the LM head only over the responses' columns; the loss must be the
    one of the plain right-padded batch with logits everywhere."""
    from instrugo import losses, models, training
    from instrugo.sft import collate, response_logits_width

    model = models.load_causal_lm("tiny", tiny_tokenizer, max_tokens=64)
    examples = [([5, 6, 7, 8, 9, 10], [0, 0, 0, 1, 1, 1]), ([5, 6, 7, 8], [0, 0, 1, 1]),
                ([1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 0, 0, 1, 1])]
    right = collate(examples, tiny_tokenizer.pad_token_id)
    logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
    expected = losses.response_lm_loss(logits.float(), right["input_ids"], right["loss_mask"])

    left = collate(examples, tiny_tokenizer.pad_token_id, "left")
    width = response_logits_width(left["loss_mask"])
    assert width == 4  # three response tokens of the first row + the prompt position before them
    kept = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"],
                 position_ids=left["position_ids"], logits_to_keep=width).logits
    assert kept.shape[1] == width
    loss = losses.response_lm_loss(kept.float(), left["input_ids"][:, -width:], left["loss_mask"][:, -width:])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)

    # What the stage runs: the model's final hidden states, the head applied by the loss in chunks; the same
    # loss and the same gradients, and the model as it was afterwards.
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    head = model.get_output_embeddings()
    with models.head_applied_by_loss(model) as applied:
        hidden = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"],
                       position_ids=left["position_ids"], logits_to_keep=width).logits
        assert applied is head and hidden.shape == (3, width, model.config.hidden_size)
    chunked = training.language_model_loss(model, left["input_ids"][:, -width:], left["loss_mask"][:, -width:],
                                           input_ids=left["input_ids"], attention_mask=left["attention_mask"],
                                           position_ids=left["position_ids"], logits_to_keep=width)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(chunked, list(model.parameters())), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert model.get_output_embeddings() is head
    torch.testing.assert_close(model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits, logits)


def test_a_head_the_loss_cannot_apply_leaves_the_model_as_it_is(tiny_tokenizer):
    """Architectures that may change the logits after the output layer (Gemma soft-caps them), and heads that
    are not plain linear layers: no swap, the caller gets None and uses the logits."""
    from instrugo import models

    model = models.load_causal_lm("tiny", tiny_tokenizer, max_tokens=64)
    head = model.get_output_embeddings()
    with models.head_applied_by_loss(model) as applied:
        assert applied is head  # a Llama
    model.config.model_type = "gemma2"
    with models.head_applied_by_loss(model) as applied:
        assert applied is None and model.get_output_embeddings() is head
    model.config.model_type = "llama"
    model.set_output_embeddings(torch.nn.Sequential(head))
    with models.head_applied_by_loss(model) as applied:
        assert applied is None and type(model.get_output_embeddings()) is torch.nn.Sequential


def test_lora_sft_in_bf16_writes_a_merged_fp32_checkpoint(tmp_path, saved_dtypes):
    """Under bf16 the frozen LoRA base is stored in bf16; the merged model must still learn and save fp32."""
    data = write_demonstrations(tmp_path / "demos.jsonl")
    out = run_sft(tiny_config(tmp_path, data, lora_rank=4, precision="bf16", lr=3e-2))
    rows = runio.read_metrics(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert saved_dtypes(out) == {"F32"}


def test_a_steps_loss_and_gradient_do_not_depend_on_its_micro_batches(tmp_path):
    """The step's gradient is the token mean over all its examples: cutting the same 4 examples (responses of
    1 to 40 words, so micro-batches hold different token counts) into 1, 2 or 4 micro-batches gives the same
    logged loss and gradient norm."""
    rows = [{"prompt": f"Answer {i}.", "response": " ".join(["word"] * n)} for i, n in enumerate((40, 1, 12, 3))]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    for micro in (4, 2, 1):
        out = run_sft(tiny_config(tmp_path / f"micro{micro}", data, epochs=1.0, micro_batch_size=micro))
        logged.append(runio.read_metrics(out / "metrics.jsonl")[0])
    for row in logged[1:]:
        assert row["loss"] == pytest.approx(logged[0]["loss"], rel=1e-4)
        assert row["grad_norm"] == pytest.approx(logged[0]["grad_norm"], rel=1e-3)


def test_micro_batches_hold_examples_of_neighbouring_lengths(tmp_path, monkeypatch):
    """Steps are length-grouped (`training.length_grouped_steps`): 16 examples of 16 different lengths, steps
    of 4 in micro-batches of 2, so every micro-batch holds two examples of adjacent length ranks, and every
    example is trained on once."""
    import instrugo.sft as sft

    rows = [{"prompt": "Answer.", "response": " ".join(["word"] * (3 * n + 1))} for n in range(16)]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    micro_lengths = []
    real_collate = sft.collate

    def recording_collate(examples, pad_id, pad_side="right"):
        micro_lengths.append(sorted(len(ids) for ids, _ in examples))
        return real_collate(examples, pad_id, pad_side)

    monkeypatch.setattr(sft, "collate", recording_collate)
    run_sft(tiny_config(tmp_path, data, epochs=1.0, batch_size=4, micro_batch_size=2))
    ranks = {length: rank for rank, length in enumerate(sorted(l for pair in micro_lengths for l in pair))}
    assert len(ranks) == 16 and len(micro_lengths) == 8
    assert sorted(ranks[pair[0]] for pair in micro_lengths) == list(range(0, 16, 2))
    assert all(ranks[pair[1]] == ranks[pair[0]] + 1 for pair in micro_lengths)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_compiled_layers_take_the_same_steps_as_eager_ones(tmp_path, compiling, lora_rank):
    """`--compile` (full weights and LoRA): every micro-batch's training pass goes through patched decoder
    layers, dynamo compiles new frames for them, and the run logs the same losses and gradient norms as
    the eager one (fp32; responses of 1 to 40 words: several shapes, no recompilation past the limit).
    The layers are plain again after the block."""
    from torch._dynamo.utils import counters

    from instrugo import models

    rows = [{"prompt": f"Answer {i}.", "response": " ".join(["word"] * n)} for i, n in enumerate((40, 1, 12, 3, 25, 7))]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    for compile_layers in (False, True):
        frames_before = counters["frames"]["ok"]
        out = run_sft(tiny_config(tmp_path / f"compile{compile_layers}", data, epochs=2.0, compile=compile_layers,
                                  lora_rank=lora_rank))
        logged.append(runio.read_metrics(out / "metrics.jsonl"))
    assert counters["frames"]["ok"] > frames_before
    assert [patched for _, patched in compiling] == [[True, True]] * 6  # 2 epochs x micro-batches of 2, 2 and 2
    for eager, compiled in zip(*logged, strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
        assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-3)

    model = models.load_causal_lm("tiny")
    with models.compiled_layers(model):
        assert all("forward" in vars(layer) for layer in model.model.layers)
    assert not any("forward" in vars(module) for module in model.modules())


def test_compile_refuses_a_model_without_repeated_layers(compiling):
    from instrugo import models
    from instrugo.runio import InputError

    with pytest.raises(InputError, match="--compile.*no repeated decoder layers"):
        with models.compiled_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


def test_without_a_cpp_compiler_compile_warns_and_runs_eager(monkeypatch, capsys):
    """Where torch.compile cannot build kernels (here: its probe fails as inductor does without a compiler),
    `compiled_layers` says so once and leaves the layers eager."""
    from torch._inductor.exc import InvalidCxxCompiler

    from instrugo import models

    def compile_without_a_compiler(fn, **kwargs):
        def compiled(*args):
            raise InvalidCxxCompiler()
        return compiled

    monkeypatch.setattr(torch, "compile", compile_without_a_compiler)
    models.compile_unavailable.cache_clear()
    model = models.load_causal_lm("tiny")
    try:
        with models.compiled_layers(model):
            assert not any("forward" in vars(module) for module in model.modules())
        assert "cannot build kernels on this machine (InvalidCxxCompiler" in capsys.readouterr().out
    finally:
        models.compile_unavailable.cache_clear()

"""Shared fixtures: tiny models built from config (same tokenizer as the default model)."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from instrugo.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir():
    from instrugo.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture
def kill_at_step(monkeypatch):
    """Make a stage die (KeyboardInterrupt, as from a kill) when it logs metrics for `step`; call the
    returned function's `.heal()` to let the next run go through."""
    from instrugo import runio

    original = runio.MetricsLog.log

    class Killer:
        def __call__(self, step):
            def log(metrics_log, row):
                if row["step"] == step:
                    raise KeyboardInterrupt(f"killed at step {step}")
                original(metrics_log, row)

            monkeypatch.setattr(runio.MetricsLog, "log", log)

        def heal(self):
            monkeypatch.setattr(runio.MetricsLog, "log", original)

    return Killer()


@pytest.fixture
def saved_dtypes():
    """The dtypes stored in a model directory's safetensors file, e.g. {"F32"}."""
    from safetensors import safe_open

    def read(model_dir):
        with safe_open(str(model_dir / "model.safetensors"), "pt") as saved:
            return {saved.get_slice(name).get_dtype() for name in saved.keys()}
    return read


@pytest.fixture
def compiling(monkeypatch):
    """For tests of `--compile`: skipped (visibly) where torch.compile cannot build kernels; fresh dynamo
    state, so the test's own layers compile; hitting the recompile limit fails instead of quietly running
    the rest eager. Yields a record of every `compiled_layers` block entered with `enabled`: the model's
    class name and whether each of its decoder layers was patched inside the block."""
    import contextlib

    import torch

    from instrugo import models

    torch._dynamo.reset()
    models._compiled_forward.cache_clear()
    if models.compile_unavailable():
        pytest.skip(f"torch.compile cannot build kernels here: {models.compile_unavailable()}")
    blocks = []
    real_compiled_layers = models.compiled_layers

    @contextlib.contextmanager
    def recording(model, enabled=True):
        with real_compiled_layers(model, enabled):
            if enabled:
                blocks.append((type(model).__name__, ["forward" in vars(layer) for layer in models.decoder_layers(model)]))
            yield

    monkeypatch.setattr(models, "compiled_layers", recording)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield blocks

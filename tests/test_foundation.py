"""Run-directory I/O, config plumbing, model loading and the comparison-task format."""

import ctypes.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from instrugo import comparisons, runio
from instrugo.config import from_dict
from instrugo.runio import InputError
from instrugo.sft import SFTConfig


def test_tokenizer_pad_is_distinct_from_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id is not None
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_tiny_model_loads_with_plain_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.num_hidden_layers == 2


BUILD_TINY_WHEN_TOLD = """
    import sys, time
    from pathlib import Path
    from instrugo import models
    from transformers import AutoModelForCausalLM
    original_atomic_directory = models.atomic_directory
    def announced_atomic_directory(final):
        print("BUILDING", flush=True)
        return original_atomic_directory(final)
    models.atomic_directory = announced_atomic_directory
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    ready.touch()
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.01)
    model = AutoModelForCausalLM.from_pretrained(models.resolve_model("tiny"))
    print(f"LAYERS={model.config.num_hidden_layers}")
"""


def test_processes_resolving_a_model_at_once_build_it_once(tmp_path):
    """The ranks of a multi-process run on a fresh machine all resolve 'tiny' (or 'default') at the same
    moment: one builds it, the others wait and load it (without the lock each built it and replaced the
    directory under the others' feet: 'Unrecognized model')."""
    from instrugo.models import resolve_model

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    default = resolve_model("default")
    (cache / "models" / default.name).symlink_to(default)  # only the tiny model is built
    env = {**os.environ, "INSTRUGO_CACHE": str(cache)}
    ready = [tmp_path / f"ready{rank}" for rank in range(3)]
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUILD_TINY_WHEN_TOLD), str(path),
                                   str(tmp_path / "go")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for path in ready]
    try:
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in ready):
            assert all(process.poll() is None for process in processes), "a process died before it was ready"
            assert time.monotonic() < deadline, "the processes never got ready"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0, 0], outputs
    printed = [line for out, _ in outputs for line in out.split()]
    assert printed.count("BUILDING") == 1 and printed.count("LAYERS=2") == 3


def test_atomic_write_leaves_no_temp_files(tmp_path):
    runio.atomic_write_json(tmp_path / "a.json", {"x": 1})
    runio.atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_directory_keeps_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt"
    with runio.atomic_directory(target) as tmp:
        (tmp / "state").write_text("one")
    with pytest.raises(RuntimeError):
        with runio.atomic_directory(target) as tmp:
            (tmp / "state").write_text("two")
            raise RuntimeError("killed mid-save")
    assert (target / "state").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_metrics_log_drops_steps_past_the_resumed_one(tmp_path):
    log = runio.MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.log({"step": step})
    runio.MetricsLog(tmp_path / "metrics.jsonl", resume_step=2).log({"step": 3, "again": True})
    rows = runio.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["again"]


def test_update_json_deep_merges(tmp_path):
    runio.update_json(tmp_path / "eval.json", {"splits": {"eval": {"sft": {"n": 1}}}})
    merged = runio.update_json(tmp_path / "eval.json", {"splits": {"eval": {"ppo": {"n": 2}}}})
    assert merged["splits"]["eval"] == {"sft": {"n": 1}, "ppo": {"n": 2}}


def test_config_rejects_unknown_and_mistyped_keys():
    with pytest.raises(InputError, match="field 'learning_rate'"):
        from_dict(SFTConfig, {"learning_rate": 1e-5}, source="cfg.yaml")
    with pytest.raises(InputError, match="cfg.yaml: field 'epochs': expected float"):
        from_dict(SFTConfig, {"epochs": "many"}, source="cfg.yaml")
    with pytest.raises(InputError, match="micro_batch_size"):
        from_dict(SFTConfig, {"batch_size": 10, "micro_batch_size": 4})
    assert from_dict(SFTConfig, {"epochs": "3", "lora-rank": 8}).lora_rank == 8


def _write(tmp_path, rows):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "ranking", "not a permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0, 1]}, "ranking", "not a permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 5]}, "ranking", "not a response index"),
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "K = 1"),
    ({"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}, "responses", "duplicate"),
    ({"prompt": "p", "responses": ["a", " "], "ranking": [0, 1]}, "responses", "response 1 is empty"),
    ({"prompt": "p", "responses": []}, "responses", "no responses"),
    ({"responses": ["a", "b"], "ranking": [0, 1]}, "prompt", "missing"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 9]}, "scores", "1..7"),
])
def test_bad_comparison_tasks_name_file_line_and_field(tmp_path, row, field, message):
    good = {"prompt": "ok", "responses": ["x", "y"], "ranking": [1, 0]}
    path = _write(tmp_path, [good, row])
    with pytest.raises(InputError) as error:
        comparisons.read_tasks(path, require_ranking=True)
    assert str(error.value).startswith(f"{path}:2: field '{field}'")
    assert message in str(error.value)


def test_ranking_with_ties_yields_only_strict_pairs(tmp_path):
    path = _write(tmp_path, [{"id": "t", "prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [[2], [0, 3], [1]]},
                             {"prompt": "q", "chosen": "good", "rejected": "bad"}])
    tied, pair = comparisons.read_tasks(path, require_ranking=True)
    assert tied.rank_levels() == [1, 2, 0, 1]
    assert sorted(tied.pairs()) == [(0, 1), (2, 0), (2, 1), (2, 3), (3, 1)]
    assert pair.responses == ["good", "bad"] and pair.pairs() == [(0, 1)]


def test_resume_survives_a_metrics_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    runio.MetricsLog(path, resume_step=2).log({"step": 3})
    assert [r["step"] for r in runio.read_metrics(path)] == [1, 2, 3]


def test_checkpoint_left_only_under_its_old_name_is_still_found(tmp_path):
    from instrugo.training import CHECKPOINT_DIR, TRAINER_STATE, load_checkpoint

    old = tmp_path / f".{CHECKPOINT_DIR}.old"
    old.mkdir()
    runio.atomic_write_json(old / TRAINER_STATE, {"step": 7})

    class FakeAccelerator:
        num_processes = 1

        def load_state(self, path):
            self.loaded = path

    accelerator = FakeAccelerator()
    assert load_checkpoint(accelerator, tmp_path) == {"step": 7} and accelerator.loaded == str(old)
    with runio.atomic_directory(tmp_path / CHECKPOINT_DIR) as tmp:
        (tmp / "new").write_text("x")
    assert (tmp_path / CHECKPOINT_DIR / "new").exists() and not old.exists()


def test_frozen_linears_in_bf16_give_the_same_logits_under_autocast(tiny_tokenizer):
    """Autocast multiplies by the bf16 cast of an fp32 weight; storing a frozen weight in bf16 must not
    change a single logit, and must leave trainable weights, embeddings and norms in fp32."""
    import torch

    from instrugo import models

    model = models.load_causal_lm("tiny", tiny_tokenizer, max_tokens=64).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    with torch.no_grad(), models.autocast("bf16"):
        expected = model(input_ids=ids).logits.float()
    model.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # one trainable weight stays fp32
    assert models.frozen_linears_to_bf16(model, "fp32") == 0
    changed = models.frozen_linears_to_bf16(model, "bf16")
    assert changed > 0
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    with torch.no_grad(), models.autocast("bf16"):
        assert torch.equal(model(input_ids=ids).logits.float(), expected)


def test_the_precision_probe_leaves_torchs_global_random_state_alone():
    """The probe runs at the first stage of a process, after the stage seeded torch: drawing from the global
    generator made a stage's minibatch order depend on whether an earlier stage had probed already."""
    import torch

    from instrugo import models

    torch.manual_seed(0)
    state = torch.get_rng_state()
    models.bf16_speedup(size=64, repeats=1)  # arguments no other caller uses: not a cached result
    assert torch.equal(torch.get_rng_state(), state)


def _in_fresh_python(code: str, env: dict[str, str]) -> str:
    """stdout of `code` in a new interpreter with the test's environment plus `env`, minus malloc settings,
    a preloaded malloc and PyTorch's huge pages (so that only glibc's malloc is measured)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env}, capture_output=True,
                          text=True, check=True, timeout=120)
    return done.stdout


REFAULTS_OF_A_FREED_BLOCK = """
    import resource
    import torch
    from instrugo import models
    models.keep_freed_memory()
    def faults_of_a_100_mib_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(25 * 2**20)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults = [faults_of_a_100_mib_tensor() for _ in range(12)]
    print(sum(faults[-3:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) only")
def test_a_freed_large_block_is_reused_without_page_faults():
    # 100 MiB is above glibc's largest mmap threshold: unless mmap is off, every such tensor gets fresh
    # pages (25,600 faults of 4 KiB). Kept in the heap, they stop faulting once the heap has grown to its
    # steady size (small allocations between them move the big one up a few times first), so the last
    # three of twelve are counted.
    assert int(_in_fresh_python(REFAULTS_OF_A_FREED_BLOCK, {})) < 1000
    # Another malloc setting in the environment (a common one in containers) leaves instrugo's in place...
    assert int(_in_fresh_python(REFAULTS_OF_A_FREED_BLOCK, {"MALLOC_ARENA_MAX": "2"})) < 1000
    # ...while one of those instrugo sets is the user's choice: instrugo leaves glibc alone then.
    assert int(_in_fresh_python(REFAULTS_OF_A_FREED_BLOCK, {"MALLOC_TOP_PAD_": str(2**20)})) > 60000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD restarts are for Linux")
def test_tcmalloc_is_preloaded_unless_the_user_chose_otherwise():
    from instrugo.__main__ import tcmalloc_environment

    only_perftools = {"tcmalloc": "libtcmalloc.so.4"}.get  # libtcmalloc-minimal4 missing, perftools' present
    assert tcmalloc_environment({"PATH": "/bin"}, only_perftools) == {
        "PATH": "/bin", "LD_PRELOAD": "libtcmalloc.so.4", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}
    assert tcmalloc_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"},
                                only_perftools)["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"
    assert tcmalloc_environment({"LD_PRELOAD": "libjemalloc.so.2"}, only_perftools) is None
    assert tcmalloc_environment({"INSTRUGO_MALLOC": "glibc"}, only_perftools) is None
    assert tcmalloc_environment({}, lambda name: None) is None


TCMALLOC_IN_USE = """
    from instrugo.__main__ import restart_with_tcmalloc
    restart_with_tcmalloc()
    print(any("tcmalloc" in line for line in open("/proc/self/maps")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not any(map(ctypes.util.find_library, ("tcmalloc_minimal", "tcmalloc"))),
                    reason="tcmalloc is not installed here (`make test` installs it where apt-get can)")
def test_the_command_restarts_itself_with_tcmalloc():
    assert _in_fresh_python(TCMALLOC_IN_USE, {}).strip() == "True"
    assert _in_fresh_python(TCMALLOC_IN_USE, {"INSTRUGO_MALLOC": "glibc"}).strip() == "False"

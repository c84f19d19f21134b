"""The benchmark's steps between the seed's method and compute_gram's are real gram passes: with the
project's changes on (padding dropped), each gives compute_gram's grams; the bfloat16 model the
benchmark makes holds the same weights as its float32 one."""

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_gram import STEPS, build_cast, ours, variant  # noqa: E402


def test_decomposition_steps_compute_the_same_grams(experts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(experts[0], dtype=torch.float32).eval()
    rng = random.Random(0)
    token_ids = [[rng.randrange(1, 300) for _ in range(rng.randint(3, 40))] for _ in range(10)]
    want = ours(model, token_ids, 4)
    for label, flags in STEPS[1:]:  # every step from "padding rows dropped" on
        for skip_logits in (False, True):
            got = variant(model, token_ids, 4, skip_logits=skip_logits, **flags)
            shared = flags["shared"]
            for key, gram in want.items():
                assert torch.allclose(got[key], gram, rtol=1e-5, atol=1e-6), (label, key)
            assert shared or len(got) > len(want), label  # without sharing, k/v/up get their own gram
    # the first step keeps the padding rows: a different sum, so a different gram
    padded = variant(model, token_ids, 4, skip_logits=False, **STEPS[0][1])
    key = next(iter(want))
    assert not torch.allclose(padded[key], want[key], rtol=1e-3)
    bf16 = build_cast(model, torch.bfloat16)
    assert bf16 is not model and torch.equal(bf16.lm_head.weight, model.lm_head.weight.bfloat16())


def test_8b_bench_writer_and_its_float64_check(experts, tmp_path):
    """bench_gram_8b.py at a tiny size: make_llama3_8b_shaped.py's writer loads as a Llama, compute_gram.py's
    layer-0 attention-input gram passes the benchmark's float64 check, and another gram fails it."""

    from bench_gram_8b import layer0_attention_error, write_rows
    from make_llama3_8b_shaped import write_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from compute_gram import main

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(num_key_value_heads=2, vocab_size=512, **small)
    config.dtype = torch.bfloat16
    model_dir = tmp_path / "m"
    config.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(experts[0]).save_pretrained(model_dir)
    write_weights(model_dir, config, "5GB", seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2 and model.lm_head.weight.shape == (512, 64)
    assert abs(model.model.layers[0].mlp.down_proj.weight.float().std().item() - 0.02) < 2e-3
    assert (model_dir / "model.safetensors").exists()  # one file at this size
    rows = write_rows(tmp_path / "rows.jsonl", 2)
    argv = ["code", "--model", str(model_dir), "--dataset", str(rows), "--num-examples", "2", "--max-length", "64"]
    path = main(
        argv + ["--device", "cpu", "--dtype", "float32", "--plan", "layers", "--output-dir", str(tmp_path / "g")]
    )
    assert layer0_attention_error(model_dir, rows, path, 2, 64) < 1e-5
    # the check can fail: layer 1's attention input is another matrix
    from safetensors.torch import load_file, save_file

    grams = load_file(path)
    grams["model.layers.0.self_attn.q_proj"] = grams["model.layers.1.self_attn.q_proj"].clone()
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file(grams, str(tmp_path / "wrong.safetensors"), meta)
    assert layer0_attention_error(model_dir, rows, tmp_path / "wrong.safetensors", 2, 64) > 1e-2

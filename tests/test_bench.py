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

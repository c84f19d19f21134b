"""bench/make_llama3_8b_shaped.py: Llama-3-8B's shapes and a tokenizer of exactly its vocabulary
(the 16 GB write itself is measured by hand, see the script's docstring)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_llama3_8b_shaped import LLAMA3_8B, build_tokenizer, weight_plan  # noqa: E402


def test_weight_plan_has_llama3_8b_shapes():
    from transformers import LlamaConfig

    plan = weight_plan(LlamaConfig(**LLAMA3_8B))
    assert sum(torch.Size(shape).numel() for shape, _ in plan.values()) == 8_030_261_248  # Llama-3-8B's count
    assert plan["model.layers.31.self_attn.k_proj.weight"] == ((1024, 4096), torch.bfloat16)
    assert plan["model.layers.0.mlp.down_proj.weight"][0] == (4096, 14336)
    assert plan["lm_head.weight"][0] == plan["model.embed_tokens.weight"][0] == (128256, 4096)


def test_tokenizer_covers_exactly_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 128256 and tok.bos_token_id == 128000 and tok.eos_token_id == 128009
    text = tok.apply_chat_template([{"role": "user", "content": "def f(x):\n    return x * 2  # é ✓"}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [128000, 128006] and ids[-1] == 128009 and max(ids) < 128256
    assert tok.decode(ids) == text

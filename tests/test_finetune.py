"""regmean/finetune.py: the reply-only loss against transformers' own, training moves only what it may, drift figures
against a plain float64 computation."""

import math

import pytest
import torch

import demo
from conftest import save_expert
from regmean.finetune import module_kind, reply_loss, sft_examples, train, weight_drift


def test_reply_loss_equals_transformers_loss_on_reply_labels(base_model, tokenizer):
    rows = demo.make_splits("math", dict(train_rows=5, calib_rows=0, test_rows=0), seed=3)["train"]
    examples = sft_examples(tokenizer, rows, "math")
    for (ids, mask), row in zip(examples, rows):
        assert 0 < sum(mask) < len(ids) and mask == sorted(mask)  # prompt first, then the reply
        reply = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        assert reply.strip() == row["answer"]
    width = max(len(i) for i, _ in examples)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in examples])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in examples])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in examples])
    with torch.no_grad():
        ours = reply_loss(base_model, ids, attention, mask)
        # transformers shifts the labels itself and ignores -100
        theirs = base_model(input_ids=ids, attention_mask=attention, labels=ids.masked_fill(mask == 0, -100)).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_train_lowers_the_loss_and_leaves_frozen_weights_alone(base_model, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(base_model.config)
    model.load_state_dict(base_model.state_dict())
    rows = demo.make_splits("code", dict(train_rows=16, calib_rows=0, test_rows=0), seed=4)["train"]
    examples = sft_examples(tokenizer, rows, "code")
    first, _ = train(model, examples, steps=1, batch_size=16, lr=0.0, seed=0, desc="t")
    last, tokens = train(
        model, examples, steps=15, batch_size=16, lr=3e-3, seed=0, desc="t", trainable=lambda n: "embed_tokens" not in n
    )
    assert last < first and tokens > 15 * 16
    after = model.state_dict()
    for name, before in base_model.state_dict().items():
        moved = not torch.equal(after[name], before)
        assert moved == ("embed_tokens" not in name), name
    assert all(p.requires_grad for p in model.parameters())  # as found


def test_weight_drift_matches_a_plain_float64_computation(tmp_path, base_model, tokenizer):
    base = tmp_path / "base"
    base_model.save_pretrained(str(base))
    a = save_expert(base_model, tmp_path / "a", tokenizer, seed=1, scale=0.05)
    b = save_expert(base_model, tmp_path / "b", tokenizer, seed=2, scale=0.10)
    drift = weight_drift(base, {"a": a, "b": b})
    from safetensors.torch import load_file

    w = {k: load_file(str(d / "model.safetensors")) for k, d in (("base", base), ("a", a), ("b", b))}
    for kind in ("q_proj", "down_proj", "embed_tokens", "lm_head", "norm"):
        names = [n for n in w["base"] if (kind in n if kind != "norm" else n.endswith("norm.weight"))]
        assert names

        def dist(x, y, names=names):
            return math.sqrt(sum(((w[x][n].double() - w[y][n].double()) ** 2).sum().item() for n in names))

        size = math.sqrt(sum((w["base"][n].double() ** 2).sum().item() for n in names))
        assert drift[kind]["a"] == pytest.approx(dist("a", "base") / size, rel=1e-9)
        assert drift[kind]["b"] == pytest.approx(dist("b", "base") / size, rel=1e-9)
        assert drift[kind]["a vs b"] == pytest.approx(dist("a", "b") / size, rel=1e-9)
    assert 0 < drift["all"]["a"] < drift["all"]["b"]  # b got twice the noise
    assert module_kind("model.layers.3.mlp.gate_proj.weight") == "gate_proj"
    assert module_kind("model.layers.3.post_attention_layernorm.weight") == "norm"

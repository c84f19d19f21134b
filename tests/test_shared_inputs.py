"""Which linear layers read the very same input (and so share one gram), detected on one forward pass of
Gemma and Mistral as on Llama: q/k/v share the attention input, gate/up the MLP input; nothing else is shared.
Checked against the inputs each module really reads (forward hooks written here), and through compute_gram.py."""

import json

import pytest
import torch

import compute_gram
from conftest import save_expert, tiny_model
from regmean.calibration import find_shared_inputs
from regmean.tensor_io import GramFile


def real_inputs(model, ids):
    """{linear module: the input it read}, from forward hooks."""
    seen, hooks = {}, []

    def hook(module, inp, out, name):
        seen[name] = inp[0].clone()  # returns None: the output is left alone

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lambda m, inp, out, name=name: hook(m, inp, out, name)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", ["gemma", "mistral"])
def test_shared_inputs_are_detected(kind, tokenizer, calib_files, tmp_path):
    model = tiny_model(kind, len(tokenizer)).eval()
    ids = torch.tensor([[1, 5, 7, 300, 42, 9, 11, 3, 17, 8, 2, 4]])
    leaders, aliases, head_name, _ = find_shared_inputs(model, ids)
    want = {}
    for layer in range(2):
        p = f"model.layers.{layer}"
        want |= {f"{p}.self_attn.k_proj": f"{p}.self_attn.q_proj", f"{p}.self_attn.v_proj": f"{p}.self_attn.q_proj"}
        want |= {f"{p}.mlp.up_proj": f"{p}.mlp.gate_proj"}
    assert aliases == want
    assert head_name == "lm_head" and len(leaders) == 2 * 4 + 1  # q, o, gate, down per layer, and lm_head
    inputs = real_inputs(model, ids)
    for other, leader in aliases.items():
        assert torch.equal(inputs[other], inputs[leader]), other
    for a in leaders:
        for b in leaders:
            if a < b:
                assert inputs[a].shape != inputs[b].shape or not torch.equal(inputs[a], inputs[b]), (a, b)

    expert = save_expert(model, tmp_path / kind, tokenizer, 1)
    out = tmp_path / "grams"
    compute_gram.main(
        ["math", "--model", str(expert), "--dataset", str(calib_files["math"]), "--output-dir", str(out)]
        + ["--max-length", "32", "--batch-size", "4", "--device", "cpu", "--dtype", "float32"]
    )
    grams = GramFile(out / "gram.safetensors")
    assert json.loads(grams.metadata["aliases"]) == want
    assert all(grams.key_of[other] == leader for other, leader in want.items())

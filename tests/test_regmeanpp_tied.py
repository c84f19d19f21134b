"""RegMean++ on experts with tied embeddings (SmolLM2's and the demo's case; the other RegMean++ tests untie
them), three experts with weights, against a float64 reference written plainly here; and the merge made again
from its model card's recipe."""

import copy

import torch
from test_merge import assert_correction_close, read_folder, rel
from test_regmeanpp import MAX_LENGTH, input_grams

import merge_model
from conftest import save_expert, tiny_config
from regmean.calibration import format_rows, load_rows, tokenize_texts

WEIGHTS, ALPHA = [1, 1, 2], 0.5


def weighted_closed_form(weights, grams, alpha, coefs):
    """(Σ cᵢ G̃ᵢ)⁻¹ Σ cᵢ G̃ᵢ Wᵢᵀ, float64."""
    a, b = 0, 0
    for w, g, c in zip(weights, grams, coefs):
        g = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
        a, b = a + c * g, b + c * g @ w.T
    return torch.linalg.solve(a, b).T


def reference(expert_dirs, data_files, kinds, alpha, coefs):
    """RegMean++ in float64 with the tie kept: layer by layer, a copy of the merged-so-far model with expert i's
    layer swapped in runs on expert i's rows, and the layer's weights are the closed form on those grams. The tied
    matrix (embedding and head at once) is the weighted mean: it is never solved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float64).eval() for d in expert_dirs]
    data = []
    for d, f, kind in zip(expert_dirs, data_files, kinds):
        tokenizer = AutoTokenizer.from_pretrained(str(d))
        data.append(tokenize_texts(tokenizer, format_rows(load_rows(str(f)), kind, tokenizer), MAX_LENGTH))
    states = [m.state_dict() for m in models]
    merged = copy.deepcopy(models[0])
    merged.load_state_dict({k: sum(c * s[k] for c, s in zip(coefs, states)) for k in states[0]})
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    for index in range(len(merged.model.layers)):
        grams = []
        for model, ids in zip(models, data):
            probe = copy.deepcopy(merged)
            layer = probe.model.layers[index] = copy.deepcopy(model.model.layers[index])
            linears = {
                f"model.layers.{index}.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
            }
            grams.append(input_grams(probe, linears, ids))
        for name in grams[0]:
            ws = [s[name + ".weight"] for s in states]
            solution = weighted_closed_form(ws, [g[name] for g in grams], alpha, coefs)
            merged.get_submodule(name).weight.data.copy_(solution)
    return merged.state_dict()


def test_tied_embeddings_three_experts_with_weights(base_model, tokenizer, calib_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), tie_word_embeddings=True))
    experts = [save_expert(tied, tmp_path / f"e{i}", tokenizer, seed) for i, seed in enumerate([60, 61, 62])]
    files, kinds = [calib_files["code"], calib_files["math"], calib_files["code"]], ["code", "math", "code"]
    args = ["regmean++", "--models", *experts, "--datasets", *files, "--formats", *kinds]
    args += ["--weights", *WEIGHTS, "--alpha", ALPHA, "--max-length", MAX_LENGTH, "--batch-size", 4, "--device", "cpu"]
    args += ["--dtype", "float32", "--forward-dtype", "float32", "--output-dir", tmp_path / "pp"]
    out = merge_model.main([str(a) for a in args])
    assert "lm_head.weight is tied to model.embed_tokens.weight" in capsys.readouterr().out
    merged, tensors = read_folder(out), [read_folder(e) for e in experts]
    coefs = [w / sum(WEIGHTS) for w in WEIGHTS]
    ref = reference(experts, files, kinds, ALPHA, coefs)
    assert "lm_head.weight" not in merged and set(merged) == set(ref) - {"lm_head.weight"}  # the tie is kept
    linear = [n for n in merged if n.endswith("proj.weight")]
    assert len(linear) == 2 * 7
    for name, w in merged.items():
        if name in linear:
            assert_correction_close(w, ref[name], [t[name] for t in tensors], coefs, 1e-4, name)
        else:  # the tied matrix and the norms: the weighted mean
            assert rel(w, ref[name]) <= 1e-6, name
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    again = merge_model.main(["--config", str(out / "README.md"), "--output-dir", str(tmp_path / "again")])
    remade = read_folder(again)
    assert set(remade) == set(merged) and all(torch.equal(remade[n], merged[n]) for n in merged)

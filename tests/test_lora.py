"""LoRA experts (regmean/adapters.py, regmean/lora_merge.py): adapters made with peft on a tiny Llama base (B
not zero, ranks 4, 2 and 3, other target modules, one rsLoRA), against the dense models they fold into."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from regmean.grams import compute_grams
from regmean.merge import merge
from regmean.tensor_io import GramFile, checkpoint_files, read_tensor
from regmean.utils import UserError

ADAPTERS = {  # name: (rank, lora_alpha, target modules, rsLoRA)
    "a": (4, 8, ["q_proj", "v_proj", "o_proj", "lm_head"], False),
    "b": (2, 4, ["q_proj", "k_proj", "up_proj", "down_proj"], True),
    "c": (3, 5, ["v_proj", "gate_proj", "down_proj"], False),
}


def make_adapter(base_dir, out_dir, seed, rank, alpha, targets, rslora, **extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, **extra)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a trained adapter's is not
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def fold(base_dir, adapter_dir, out_dir, tokenizer):
    """The dense model an adapter stands for (peft's merge_and_unload), for the comparisons only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tokenizer, calib_files):
    """The base, three adapters, their folded dense twins, and grams of the adapters (with the adapter applied)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = d / "base"
    AutoModelForCausalLM.from_config(tiny_config(len(tokenizer))).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    adapters, folded, grams = [], [], []
    for seed, (name, spec) in enumerate(ADAPTERS.items(), start=20):
        adapters.append(make_adapter(base, d / name, seed, *spec))
        folded.append(fold(base, adapters[-1], d / f"{name}-folded", tokenizer))
        data = calib_files["code" if name != "b" else "math"]
        fmt = "code" if name != "b" else "math"
        grams.append(
            compute_grams(adapters[-1], data, fmt, d / f"g-{name}", num_examples=6, dtype="float32", device="cpu")
        )
    return dict(dir=d, base=base, adapters=adapters, folded=folded, grams=grams, calib=calib_files)


@pytest.fixture
def solve64(monkeypatch):
    """Every solve in float64 (solver.TOLERANCE 0): the float32 solve is only good to its 1e-5 tolerance of the
    weight, on whatever right-hand side it is given, so the dense and the adapter merge, which solve other rows,
    agree to that and no closer (7.5e-6 measured on layers.1 down_proj at alpha 1:
    test_adapter_output_at_the_default_solve). In float64 they agree to the
    rounding of the written float32 weight."""
    from regmean import solver

    monkeypatch.setattr(solver, "TOLERANCE", 0.0)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tensors_of(folder):
    return {k: read_tensor(f, k) for k, f in checkpoint_files(folder).items()}


def folded_adapter(base, adapter_dir):
    """W₀ + BA·s of every tensor of a merged adapter on the base (its scaling from its config)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    weights, lora = tensors_of(base), load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key in [k for k in lora if k.endswith("lora_A.weight")]:
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        b = lora[key.replace("lora_A", "lora_B")]
        weights[name] = weights[name].double() + (b.double() @ lora[key].double()) * scaling
    return weights


def test_grams_with_the_adapter_applied_are_the_folded_models(loras):
    """compute_gram.py on an adapter: the grams of its base with the adapter applied, those of the folded model."""
    d = loras["dir"]
    for i, name in enumerate(ADAPTERS):
        data, fmt = (loras["calib"]["math"], "math") if name == "b" else (loras["calib"]["code"], "code")
        dense = compute_grams(
            loras["folded"][i], data, fmt, d / f"gd-{name}", num_examples=6, dtype="float32", device="cpu"
        )
        mine, theirs = GramFile(loras["grams"][i]), GramFile(dense)
        assert mine.key_of == theirs.key_of  # the same inputs hooked, under the same names
        for key in set(theirs.key_of.values()):
            assert rel(mine.get(key), theirs.get(key)) < 1e-6, (name, key)
        assert mine.metadata["model_fingerprint"].startswith("lora-v1:")  # bound to base and adapter


def test_layer_plan_grams_with_the_adapter_applied(loras):
    """--plan layers on an adapter: each layer's tensors folded as read; the folded model's layer-plan grams."""
    d, data = loras["dir"], loras["calib"]["math"]
    settings = dict(num_examples=5, dtype="float32", device="cpu", plan="layers")
    mine = GramFile(compute_grams(f"{loras['base']}+{loras['adapters'][1]}", data, "math", d / "gl-b", **settings))
    theirs = GramFile(compute_grams(loras["folded"][1], data, "math", d / "gl-b-folded", **settings))
    assert mine.key_of == theirs.key_of
    for key in set(theirs.key_of.values()):
        assert rel(mine.get(key), theirs.get(key)) < 1e-6, key
    whole = GramFile(loras["grams"][1])  # the whole-model plan, 6 rows: the same model, one more row
    assert whole.metadata["model_fingerprint"] == mine.metadata["model_fingerprint"]


def dense_merge(loras, out, **kw):
    """The dense RegMean merge of the folded experts, on the adapters' grams (the same values, other fingerprints)."""
    return merge(models=[str(f) for f in loras["folded"]], allow_gram_mismatch=True, output_dir=str(out), **kw)


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_adapter_output_folded_is_the_dense_merge(loras, alpha, solve64):
    """N = 3 adapters, weights 1 2 3: the merged adapter folded onto the base is the dense RegMean merge of the
    folded experts; the dense output of the adapters is too."""
    d, grams = loras["dir"], [str(g) for g in loras["grams"]]
    common = dict(method="regmean", grams=grams, weights=[1.0, 2.0, 3.0], alpha=alpha, device="cpu", dtype="float32")
    dense = tensors_of(dense_merge(loras, d / f"dense-{alpha}", error_sample_every=0, **common))
    adapters = [str(a) for a in loras["adapters"]]
    out = merge(models=adapters, output_format="adapter", output_dir=str(d / f"ad-{alpha}"), **common)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 + 3 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {m for spec in ADAPTERS.values() for m in spec[2]}
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "- lora" in card and "- merge" in card and "- regmean" in card
    assert "output_format: adapter" in card  # the recipe makes the adapter again
    folded = folded_adapter(loras["base"], out)
    for name, w in dense.items():
        assert rel(folded[name], w) < 1e-6, name
    dense_out = tensors_of(merge(models=adapters, output_dir=str(d / f"dense-ad-{alpha}"), **common))
    for name, w in dense.items():
        assert rel(dense_out[name], w) < 1e-6, name
    if alpha == 1.0:  # the card's recipe makes the adapter again
        from merge_model import main

        again = main(["--config", str(out / "README.md"), "--output-dir", str(d / "again"), "--device", "cpu"])
        first, second = (
            load_file(str(out / "adapter_model.safetensors")),
            load_file(str(again / "adapter_model.safetensors")),
        )
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_merged_adapter_loads_in_peft_with_the_dense_logits(loras, solve64):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, grams, adapters = loras["dir"], [str(g) for g in loras["grams"]], [str(a) for a in loras["adapters"]]
    common = dict(method="regmean", grams=grams, alpha=0.5, device="cpu", dtype="float32", error_sample_every=0)
    dense = dense_merge(loras, d / "dense-logits", **common)
    out = merge(models=adapters, output_format="adapter", output_dir=str(d / "ad-logits"), **common)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(loras["base"], dtype=torch.float32), out)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(ids).logits
        mine = model(ids).logits
    assert rel(mine, theirs) < 1e-5


def test_avg_of_adapters(loras):
    """avg: the adapter output (Aᵢ scaled by cᵢ) and the dense output are the mean of the folded experts."""
    d, adapters = loras["dir"], [str(a) for a in loras["adapters"]]
    common = dict(method="avg", weights=[1.0, 1.0, 2.0], device="cpu", dtype="float32")
    dense = tensors_of(merge(models=[str(f) for f in loras["folded"]], output_dir=str(d / "avg-dense"), **common))
    folded = folded_adapter(
        loras["base"], merge(models=adapters, output_format="adapter", output_dir=str(d / "avg-a"), **common)
    )
    for name, w in dense.items():
        assert rel(folded[name], w) < 1e-6, name


def test_a_scaling_left_out_fails_the_equality(loras, monkeypatch, solve64):
    """The planted error: the fold without the adapter's scaling. The dense merge of the adapters is then far
    from the merge of the folded experts, as the equality test would see."""
    from regmean import adapters

    def fold_without_scaling(self, name, w, rows=None):
        m = self.modules.get(name.removesuffix(".weight"))
        if m is None:
            return w
        return w.float() + read_tensor(self.file, m.b_key, rows).float() @ read_tensor(self.file, m.a_key).float()

    d, grams = loras["dir"], [str(g) for g in loras["grams"]]
    common = dict(method="regmean", grams=grams, alpha=0.1, device="cpu", dtype="float32", error_sample_every=0)
    dense = tensors_of(dense_merge(loras, d / "planted-dense", **common))
    monkeypatch.setattr(adapters.Lora, "fold", fold_without_scaling)
    wrong = tensors_of(
        merge(
            models=[str(a) for a in loras["adapters"]],
            output_dir=str(d / "planted"),
            allow_gram_mismatch=True,
            **common,
        )
    )
    assert max(rel(wrong[n], w) for n, w in dense.items()) > 1e-3


def test_unexcited_directions_keep_the_average_in_the_adapter(loras):
    """20 calibration tokens for 64 inputs, alpha 1: the merged adapter's weight equals the average's (itself a
    LoRA: the avg adapter output) in every direction the data never excited, and the report counts them."""
    d, adapters = loras["dir"], [str(a) for a in loras["adapters"]]
    grams = [
        compute_grams(a, loras["calib"]["code"], "code", d / f"few-{i}", num_examples=1, max_length=20, device="cpu")
        for i, a in enumerate(adapters)
    ]
    common = dict(device="cpu", dtype="float32", output_format="adapter")
    out = merge(
        "regmean", models=adapters, grams=[str(g) for g in grams], alpha=1.0, output_dir=str(d / "few"), **common
    )
    avg = merge("avg", models=adapters, output_dir=str(d / "few-avg"), **common)
    merged, average = folded_adapter(loras["base"], out), folded_adapter(loras["base"], avg)
    report = json.loads((out / "merge_report.json").read_text())["layers"]
    assert sum(r.get("unexcited", 0) for r in report) > 0
    checked = 0
    for r in report:
        if not r.get("unexcited"):
            continue
        files = [GramFile(g) for g in grams]
        a = sum(f.get(r["gram"]).double() for f in files) / 3
        evals, evecs = torch.linalg.eigh(a)
        null = evecs[:, evals < 1e-6 * evals.max()]
        deviation = merged[r["tensor"]] - average[r["tensor"]]
        lora_part = merged[r["tensor"]] - tensors_of(loras["base"])[r["tensor"]]  # the merged ΔW
        assert null.shape[1] > 0
        assert (deviation @ null).norm() / lora_part.norm() < 1e-6, r["tensor"]
        checked += 1
    assert checked >= 3


def edited_adapter(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config | changes))
    return dst


def test_bad_input_is_one_line_and_nothing_written(loras, tokenizer):
    """An adapter of another base, a PEFT type that is not LoRA, DoRA, a missing base, a dense expert with
    --output-format adapter: each refused in one line naming it, before anything is written."""
    from transformers import AutoModelForCausalLM

    from merge_model import main

    d, (a, b, _) = loras["dir"], loras["adapters"]
    torch.manual_seed(1)
    other = d / "other-base"
    AutoModelForCausalLM.from_config(tiny_config(len(tokenizer))).save_pretrained(str(other))
    tokenizer.save_pretrained(str(other))
    foreign = make_adapter(other, d / "foreign", 5, 2, 4, ["q_proj"], False)
    cases = {
        "another base": ([str(a), str(foreign)], [], "another base"),
        "named base differs": ([str(a), f"{loras['base']}+{foreign}"], [], "is an adapter of"),
        "IA3": ([str(a), str(edited_adapter(b, d / "ia3", peft_type="IA3"))], [], "a PEFT IA3 adapter"),
        "DoRA": ([str(a), str(edited_adapter(b, d / "dora", use_dora=True))], [], "DoRA (use_dora)"),
        "missing base": (
            [str(a), str(edited_adapter(b, d / "lost", base_model_name_or_path=str(d / "gone")))],
            [],
            "the base model is missing",
        ),
        "no base": ([str(a), str(edited_adapter(b, d / "nobase", base_model_name_or_path=None))], [], "no base"),
        "dense expert": ([str(a), str(loras["folded"][1])], ["--output-format", "adapter"], "is a dense model"),
    }
    for case, (models, extra, says) in cases.items():
        out = d / f"refused-{case.replace(' ', '-')}"
        with pytest.raises(UserError) as e:
            main(["avg", "--models", *models, "--output-dir", str(out), *extra])
        assert says in str(e.value) and "\n" not in str(e.value), (case, str(e.value))
        assert not out.exists() and not list(d.glob(f".{out.name}*")), case


def test_dense_and_adapter_experts_mix_and_saved_modules(loras):
    """A dense expert with an adapter in BASE+ADAPTER form (through merge_model.py), and an adapter with
    modules_to_save: the dense output is the merge of the folded models; the adapter output refuses saved
    modules in one line."""
    from merge_model import main

    d, base = loras["dir"], loras["base"]
    saving = make_adapter(base, d / "saving", 7, 2, 4, ["k_proj"], False, modules_to_save=["lm_head"])
    with torch.no_grad():  # a trained head: not the base's
        tensors = load_file(str(saving / "adapter_model.safetensors"))
        tensors["base_model.model.lm_head.weight"] += 0.1
    from safetensors.torch import save_file

    save_file(tensors, str(saving / "adapter_model.safetensors"))
    folded_saving = d / "saving-folded"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, str(saving)).merge_and_unload().save_pretrained(str(folded_saving))
    dense = [str(loras["folded"][0]), str(folded_saving)]
    want = tensors_of(main(["avg", "--models", *dense, "--output-dir", str(d / "mix-want"), "--dtype", "float32"]))
    mixed = [str(loras["folded"][0]), f"{base}+{saving}"]
    got = tensors_of(main(["avg", "--models", *mixed, "--output-dir", str(d / "mix"), "--dtype", "float32"]))
    assert rel(got["lm_head.weight"], tensors_of(base)["lm_head.weight"]) > 1e-3  # the saved head was merged
    for name, w in want.items():
        assert rel(got[name], w) < 1e-6, name
    with pytest.raises(UserError, match="modules_to_save"):
        main(["avg", "--models", str(loras["adapters"][0]), str(saving), "--output-format", "adapter",
              "--output-dir", str(d / "saved-refused")])  # fmt: skip
    assert not (d / "saved-refused").exists()


def test_regmeanpp_of_adapters_is_that_of_the_folded_experts(loras):
    """regmean++ reads each adapter expert's layers folded as it runs them: its dense output is the
    regmean++ merge of the folded experts."""
    d, c = loras["dir"], loras["calib"]
    common = dict(datasets=[str(c["code"]), str(c["math"])], formats=["code", "math"], num_examples=4)
    common |= dict(device="cpu", dtype="float32", forward_dtype="float32", error_sample_every=0)
    want = tensors_of(
        merge("regmean++", models=[str(f) for f in loras["folded"][:2]], output_dir=str(d / "pp-want"), **common)
    )
    got = tensors_of(
        merge("regmean++", models=[str(a) for a in loras["adapters"][:2]], output_dir=str(d / "pp"), **common)
    )
    for name, w in want.items():
        assert rel(got[name], w) < 1e-5, name


def test_adapter_output_at_the_default_solve(loras, monkeypatch):
    """The default solve (float32 Cholesky where its estimated error is below solver.TOLERANCE of what it solves),
    alpha 1, N = 3, weights 1 2 3: each output is within TOLERANCE of the float64 merge, relative to the whole weight,
    and so within TOLERANCE of each other. 1e-6 holds only for the float64 solve (test above): the dense path accepts
    float32 on a layer whose error is up to TOLERANCE of W, where the adapter path, whose estimate is relative to the
    stacked A (ΔW's factor), takes float64 (docs/merging.md, "How exact the adapter output is")."""
    from regmean import solver

    d, grams, adapters = loras["dir"], [str(g) for g in loras["grams"]], [str(a) for a in loras["adapters"]]
    common = dict(method="regmean", grams=grams, weights=[1.0, 2.0, 3.0], alpha=1.0, device="cpu", dtype="float32")
    common["error_sample_every"] = 0
    dense = tensors_of(dense_merge(loras, d / "default-dense", **common))
    out = merge(models=adapters, output_format="adapter", output_dir=str(d / "default-adapter"), **common)
    folded = folded_adapter(loras["base"], out)
    tolerance = solver.TOLERANCE
    monkeypatch.setattr(solver, "TOLERANCE", 0.0)
    exact = tensors_of(dense_merge(loras, d / "default-dense64", **common))
    worst = {"dense": 0.0, "adapter": 0.0, "adapter vs dense": 0.0}
    for name, w in exact.items():
        worst["dense"] = max(worst["dense"], rel(dense[name], w))
        worst["adapter"] = max(worst["adapter"], rel(folded[name], w))
        worst["adapter vs dense"] = max(worst["adapter vs dense"], rel(folded[name], dense[name]))
    assert max(worst.values()) <= tolerance, worst
    assert worst["dense"] > 1e-6  # this fixture has the layer that shows it (7.5e-6 measured): the bound is not idle


def test_smollm2_adapters_round_trip_through_the_adapter_output(smollm2_dir, calib_files, tmp_path):
    """Two adapters of the real SmolLM2-135M-Instruct (the demo's target modules, ranks 16 and 8, B random, on
    layer 0 only to keep it fast), RegMean α 0.1 on their grams: the adapter output loaded by peft on the base
    is the dense merge of the same adapters (weights and logits)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from regmean.finetune import LORA_TARGETS

    targets, extra = list(LORA_TARGETS), dict(layers_to_transform=[0])
    adapters = [make_adapter(smollm2_dir, tmp_path / f"a{r}", r, r, 2 * r, targets, False, **extra) for r in (16, 8)]
    settings = dict(num_examples=2, max_length=32, dtype="float32", device="cpu")
    grams = [str(compute_grams(a, calib_files["code"], "code", tmp_path / f"g{i}", **settings)) for i, a in
             enumerate(adapters)]  # fmt: skip
    common = dict(method="regmean", models=[str(a) for a in adapters], grams=grams, alpha=0.1, device="cpu")
    common |= dict(dtype="float32", error_sample_every=0, exclude=[r"layers\.([1-9]|\d\d)\."])
    dense = merge(output_dir=str(tmp_path / "dense"), **common)
    out = merge(output_format="adapter", output_dir=str(tmp_path / "adapter"), **common)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 24
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    theirs_model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    with torch.no_grad():
        mine, theirs = model(ids).logits, theirs_model(ids).logits
    assert rel(mine, theirs) < 1e-5
    weights = model.merge_and_unload().state_dict()
    for name, w in tensors_of(dense).items():
        assert rel(weights[name], w) < 1e-5, name  # the default solve: within solver.TOLERANCE (test above)


def test_judge_an_adapter_output(loras):
    """judge_merge.py on an adapter-output folder (its experts and grams from its card): the merged adapter folded
    into its base as read, the same figures as for the dense output of the same merge."""
    from judge_merge import main

    d, grams, adapters = loras["dir"], [str(g) for g in loras["grams"][:2]], [str(a) for a in loras["adapters"][:2]]
    common = dict(method="regmean", grams=grams, alpha=0.5, device="cpu", dtype="float32", error_sample_every=0)
    dense = merge(models=adapters, output_dir=str(d / "judge-dense"), **common)
    out = merge(models=adapters, output_format="adapter", output_dir=str(d / "judge-adapter"), **common)
    figures = {}
    for folder in (dense, out):
        args = [str(folder), "--models", *adapters, "--grams", *grams, "--sample-every", "1", "--device", "cpu"]
        report = json.loads(main(args if folder == dense else [str(folder), "--sample-every", "1"]).read_text())
        figures[folder] = {r["tensor"]: r["output_error"] for r in report["layers"]}
    assert figures[dense].keys() == figures[out].keys() and len(figures[out]) == 15
    for name, f in figures[dense].items():
        for mine, theirs in zip(figures[out][name]["merged"], f["merged"]):
            assert abs(mine - theirs) <= 1e-4 * theirs + 1e-12, name

"""The reference's own arithmetic on demand (issue 32): compute_gram.py --rows reference against a plain
re-statement of the reference's gram method written here (its tokenization, its batches through
transformers' DataCollatorWithPadding, forward hooks on every nn.Linear, a float32 running mean over every
position), and merge_model.py regmean --solve reference against torch.linalg.lstsq(driver="gels")."""

import copy
import json
import re

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from compute_gram import main as compute_main
from conftest import save_expert
from regmean.tensor_io import GramFile
from regmean.utils import FORMATS, UserError

MAX_LENGTH = 200  # 4 of the 13 code rows are cut, the others run 85-169 tokens: mixed lengths in every batch
BATCH = 4  # 13 code rows: batches of 4, 4, 4 and 1


def reference_method(model_dir, data, fmt, max_length, batch_size):
    """{module: gram} as the reference's compute_gram.py computed it, re-stated plainly."""
    from transformers import AutoModelForCausalLM, DataCollatorWithPadding

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        text = tok.apply_chat_template([{"role": r, "content": row[c]} for r, c in FORMATS[fmt]], tokenize=False)
        rows.append(tok(text, truncation=True, max_length=max_length))  # special tokens added
    grams, counts = {}, {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().float()
            x = x.view(-1, x.size(-1))
            xtx = x.T @ x
            if name not in grams:
                grams[name], counts[name] = xtx / x.size(0), x.size(0)
            else:
                grams[name] = (grams[name] * counts[name] + xtx) / (x.size(0) + counts[name])
                counts[name] += x.size(0)

        return record

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook(name))
    collator = DataCollatorWithPadding(tok)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collator(
                [dict(input_ids=r["input_ids"], attention_mask=r["attention_mask"]) for r in rows[i : i + batch_size]]
            )
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return grams, sum(counts.values()) // len(counts), rows


@pytest.mark.parametrize("side", ["right", "left"])
def test_reference_rows_equal_the_reference_method(tokenizer, base_model, calib_files, tmp_path, side):
    model_dir = save_expert(base_model, tmp_path / "expert", tokenizer, seed=11)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config | dict(padding_side=side)))
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.padding_side == side
    expected, positions, rows = reference_method(model_dir, calib_files["code"], "code", MAX_LENGTH, BATCH)
    ids = [r["input_ids"] for r in rows]
    assert all(r[:2] == [tok.bos_token_id] * 2 for r in ids)  # the template's BOS and one more
    assert len({len(r) for r in ids}) > 3 and max(map(len, ids)) == MAX_LENGTH
    path = compute_main(
        ["--model", str(model_dir), "--dataset", str(calib_files["code"]), "--format", "code", "--rows", "reference"]
        + ["--output-dir", str(tmp_path / "grams"), "--max-length", str(MAX_LENGTH), "--batch-size", str(BATCH)]
        + ["--device", "cpu", "--dtype", "float32", "--plan", "model"]
    )
    grams = GramFile(path)
    assert grams.metadata["rows"] == "reference" and int(grams.metadata["num_tokens"]) == positions
    assert f"padded on the {side}" in grams.metadata["padding"]
    assert sorted(grams.modules()) == sorted(expected)
    for name, ref in expected.items():
        err = (grams.get(name) - ref).abs().max() / ref.abs().max()
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_reference_rows_refuse_what_they_cannot_do(tokenizer, base_model, calib_files, tmp_path, capsys):
    model_dir = save_expert(base_model, tmp_path / "expert", tokenizer, seed=12)
    common = ["--model", str(model_dir), "--dataset", str(calib_files["code"]), "--format", "code"]
    common += ["--rows", "reference", "--device", "cpu", "--dtype", "float32"]
    with pytest.raises(UserError, match=r"^--rows reference needs --plan model: the layer plan leaves the padding out"):
        compute_main([*common, "--plan", "layers", "--output-dir", str(tmp_path / "layers")])
    assert not (tmp_path / "layers").exists()
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    model_dir = save_expert(base_model, tmp_path / "no-pad", no_pad, seed=12)
    with pytest.raises(UserError, match=r"^--rows reference pads with the tokenizer's pad token, and .* has none"):
        compute_main([*common[2:], "--model", str(model_dir), "--output-dir", str(tmp_path / "no-pad-grams")])
    assert not (tmp_path / "no-pad-grams").exists()


# ----------------------------------------------------------------------------- the reference's solve
def reduce_as_the_reference(gram, a):
    """Its reduce_non_diag: G times diag(1 - a) + a."""
    n = gram.shape[0]
    return gram * (torch.diag(torch.ones(n) - a) + torch.zeros(n, n).fill_(a))


def test_reference_solve_is_lstsq_gels_bit_for_bit(experts, calib_files, tmp_path, capsys):
    from merge_model import main as merge_main
    from regmean.recipe import read_recipe
    from regmean.tensor_io import checkpoint_files, read_tensor

    grams = []
    for expert, kind in zip(experts, ["code", "math"]):
        grams.append(
            compute_main(
                ["--model", str(expert), "--dataset", str(calib_files[kind]), "--format", kind, "--rows", "reference"]
                + ["--output-dir", str(tmp_path / kind), "--batch-size", "4", "--max-length", "64"]
                + ["--device", "cpu", "--dtype", "float32", "--plan", "model"]
            )
        )
    capsys.readouterr()
    out = merge_main(
        ["regmean", "--models", *map(str, experts), "--grams", *map(str, grams), "--solve", "reference"]
        + ["--device", "cpu", "--output-dir", str(tmp_path / "merged"), "--block-mb", "0.01"]
    )
    log = capsys.readouterr()
    assert "warning: --solve reference is the reference's arithmetic, kept for reproduction" in log.err
    assert "output error" in log.out.lower() and "lstsq-gels" in log.out
    card = (out / "README.md").read_text()
    assert "solve: reference" in card and "rows: reference" in card and "Output dtype: float32" in card
    assert read_recipe(out)["solve"] == "reference"  # --config makes it again
    files = checkpoint_files(out)
    expert_files = [checkpoint_files(e) for e in experts]
    files_of = {name: read_tensor(f, name).dtype for name, f in files.items()}
    assert set(files_of.values()) == {torch.float32}
    gram_files = [GramFile(g) for g in grams]
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]:
        name = module + ".weight"
        reduced = [reduce_as_the_reference(g.get(module), 0.1) for g in gram_files]
        weights = [read_tensor(f[name], name).float() for f in expert_files]
        rhs = sum(r @ w.transpose(0, 1) for r, w in zip(reduced, weights))
        expected = torch.linalg.lstsq(sum(reduced), rhs, driver="gels").solution.transpose(0, 1)
        assert torch.equal(read_tensor(files[name], name), expected), module  # bit for bit


def test_reference_solve_does_not_keep_the_average_where_the_data_never_went():
    """Inputs confined to 40 of 64 directions (the same for both experts): at alpha 1 the system is singular.
    Our solve leaves the 24 others at the average; the reference's lstsq puts rounding noise there."""
    from regmean.solver import ReferenceSystem, RegMeanSystem

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    seen, unseen = basis[:, :40], basis[:, 40:]
    grams = []
    for _ in range(2):
        x = torch.randn(500, 40, generator=g, dtype=torch.float64) @ seen.T
        grams.append((x.T @ x / 500).float())
    weights = [torch.randn(32, 64, generator=g) for _ in range(2)]
    average = (weights[0] + weights[1]) / 2
    ours, _, _ = RegMeanSystem.factor(grams, 1.0, [0.5, 0.5]).solve(weights)
    theirs, _, _ = ReferenceSystem.factor(grams, 1.0, [0.5, 0.5]).solve(weights)
    scale = average.double().norm()
    ours_off = ((ours - average).double() @ unseen).norm() / scale
    theirs_off = ((theirs - average).double() @ unseen).norm() / scale
    assert ours_off < 1e-5, ours_off
    assert theirs_off > 1e-2, theirs_off
    # where the data went, both solve the same system
    assert ((ours - theirs).double() @ seen).norm() / scale < 1e-2


def test_reference_solve_is_for_regmean_only(experts, tmp_path):
    from merge_model import main as merge_main

    for method in ("avg", "regmean++"):
        with pytest.raises(
            UserError, match=rf"^--solve reference is for regmean .*; {re.escape(method)} solves its own way$"
        ):
            merge_main([method, "--models", *map(str, experts), "--solve", "reference"])


# ----------------------------------------------------------------------------- the reference's gram.pkl
def test_identical_grams_of_a_gram_pkl_are_factored_once(experts, calib_files, tmp_path, capsys):
    """The reference's gram.pkl holds q/k/v's (gate/up's) gram once per module: read, they are recognized as
    copies and factored once, as gram.safetensors' aliases are; a gram that differs by one bit is not."""
    import pickle

    from merge_model import main as merge_main

    v2, pkl = [], []
    for i, (expert, kind) in enumerate(zip(experts, ["code", "math"])):
        path = compute_main(
            ["--model", str(expert), "--dataset", str(calib_files[kind]), "--format", kind]
            + ["--output-dir", str(tmp_path / kind), "--device", "cpu", "--dtype", "float32", "--plan", "model"]
        )
        grams = GramFile(path)
        every = {m: grams.get(m).clone() for m in grams.modules()}  # a gram per module, copies as the reference's
        if i == 1:  # one bit off: not the same gram
            k = every["model.layers.1.self_attn.k_proj"]
            k.view(torch.int32)[0, 0] += 1
        with open(tmp_path / f"{kind}.pkl", "wb") as f:
            pickle.dump(every, f)
        v2.append(path)
        pkl.append(tmp_path / f"{kind}.pkl")
    capsys.readouterr()
    reports = {}
    for name, files in (("v2", v2), ("pkl", pkl)):
        out = merge_main(
            ["regmean", "--models", *map(str, experts), "--grams", *map(str, files), "--device", "cpu"]
            + ["--output-dir", str(tmp_path / name), "--dtype", "float32"]
        )
        reports[name] = json.loads((out / "merge_report.json").read_text())["layers"]
    log = capsys.readouterr().out
    factored = {r["tensor"] for r in reports["pkl"] if not r.get("factor_reused")}
    reused = {r["tensor"] for r in reports["pkl"] if r.get("factor_reused")}
    for layer, attention in ((0, 1), (1, 2)):  # layer 1's k_proj gram is one bit off q_proj's and v_proj's
        p = f"model.layers.{layer}"
        assert len({f"{p}.self_attn.{m}_proj.weight" for m in "qkv"} & factored) == attention
        assert len({f"{p}.mlp.{m}_proj.weight" for m in ("gate", "up")} & factored) == 1
    assert "model.layers.1.self_attn.k_proj.weight" in factored and len(reused) == 5
    assert len(factored) == len({r["gram"] for r in reports["v2"]}) + 1
    assert "5 layers read a gram identical to another's, factored once" in log
    assert not any(r.get("factor_reused") for r in reports["v2"])  # there the aliases group them already

"""The reference's own arithmetic on demand (issue 32): compute_gram.py --rows reference against a plain
re-statement of the reference's gram method written here (its tokenization, its batches through
transformers' DataCollatorWithPadding, forward hooks on every nn.Linear, a float32 running mean over every
position), and merge_model.py regmean --solve reference against torch.linalg.lstsq(driver="gels")."""

import copy
import json

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

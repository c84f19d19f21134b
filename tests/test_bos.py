"""Calibration rows start with exactly one BOS, whatever the chat template writes (none, one, two): compute_gram.py
on a tiny model whose template writes each, against a float64 reference from rows built plainly as [BOS] + text."""

import copy
import json

import torch
from torch import nn

from compute_gram import main
from conftest import save_expert
from demo import CHAT_TEMPLATE
from regmean.calibration import calibration_tokens, tokenize_texts
from regmean.tensor_io import GramFile
from regmean.utils import FORMATS

MAX_LENGTH = 24  # math rows run longer: every row is cut, so the BOS put in front must not push one past it
BOS = "{{ bos_token }}"
TEMPLATES = {"none": CHAT_TEMPLATE.removeprefix(BOS), "one": CHAT_TEMPLATE, "two": BOS + CHAT_TEMPLATE}


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def reference_grams(model_dir, tokenizer, data):
    """{module: Σxᵀx / n} in float64, one row at a time, each row [BOS] + the text of a template writing none."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    plain = with_template(tokenizer, TEMPLATES["none"])
    sums, n = {}, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):

            def hook(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.T @ x

            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        for line in data.read_text().splitlines():
            row = json.loads(line)
            text = plain.apply_chat_template(
                [{"role": r, "content": row[c]} for r, c in FORMATS["math"]], tokenize=False
            )
            ids = ([tokenizer.bos_token_id] + plain(text, add_special_tokens=False).input_ids)[:MAX_LENGTH]
            model(input_ids=torch.tensor([ids]))
            n += len(ids)
    return {k: v / n for k, v in sums.items()}, n


def test_grams_from_rows_with_one_bos(tokenizer, base_model, calib_files, tmp_path):
    assert CHAT_TEMPLATE.startswith(BOS)
    bos = tokenizer.bos_token_id
    reference, num_tokens = None, None
    for written, template in TEMPLATES.items():
        tok = with_template(tokenizer, template)
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        written_bos = next(k for k in range(3, -1, -1) if text.startswith(tokenizer.bos_token * k))
        assert written_bos == {"none": 0, "one": 1, "two": 2}[written]
        model_dir = save_expert(base_model, tmp_path / written, tok, seed=10)  # the same weights each time
        rows = calibration_tokens(tok, str(calib_files["math"]), "math", "train", 100, MAX_LENGTH)
        assert all(ids[0] == bos and ids[1] != bos and len(ids) == MAX_LENGTH for ids in rows), written
        path = main(
            ["toy-math", "--model", str(model_dir), "--dataset", str(calib_files["math"]), "--output-dir"]
            + [str(tmp_path / f"grams-{written}"), "--max-length", str(MAX_LENGTH), "--batch-size", "4"]
            + ["--device", "cpu", "--dtype", "float32"]
        )
        if reference is None:
            reference, num_tokens = reference_grams(model_dir, tokenizer, calib_files["math"])
        grams = GramFile(path)
        assert int(grams.metadata["num_tokens"]) == num_tokens == 11 * MAX_LENGTH
        assert (
            grams.metadata["bos"]
            == "exactly one <|begin_of_text|> (id 0) starts every row, whatever the chat template writes"
        )
        assert sorted(grams.modules()) == sorted(reference)
        for name, ref in reference.items():
            err = (grams.get(name).double() - ref).abs().max() / ref.abs().max()
            assert err < 2e-5, f"{written}: {name}: relative error {err:.2e}"


def test_tokenizer_without_bos_is_left_alone(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = None
    texts = ["<|begin_of_text|>a b", "a b c d e f"]
    assert tokenize_texts(tok, texts, 3) == [tok(t, add_special_tokens=False).input_ids[:3] for t in texts]
    assert tokenize_texts(tokenizer, texts, 3)[1][0] == tokenizer.bos_token_id

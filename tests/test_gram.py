"""compute_gram.py against a float64 reference computed one example at a time, unpadded."""

import json
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from compute_gram import main
from conftest import ROOT, make_rows, save_expert, tiny_qwen2, write_jsonl
from regmean.calibration import Gram
from regmean.model_plan import CHECKPOINT_FILE
from regmean.tensor_io import GramFile
from regmean.utils import FORMATS, GRAM_FILE, UserError, first_line

MAX_LENGTH = 160  # code rows run 84-246 tokens: some get truncated, the rest need padding


def run(model_dir, data, out_dir, *extra, preset="toy-code"):
    return main(
        [
            preset,
            "--model",
            str(model_dir),
            "--dataset",
            str(data),
            "--output-dir",
            str(out_dir),
            "--max-length",
            str(MAX_LENGTH),
            "--device",
            "cpu",
            "--dtype",
            "float32",  # the float64 comparisons hold float32's tolerances, on any cpu; a later --dtype wins
            *extra,
        ]
    )


def reference_grams(model_dir, data, fmt, max_length=MAX_LENGTH):
    """{module: Σxᵀx / n} in float64 for every nn.Linear, one example at a time, no padding,
    logits computed; plus the token count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    sums, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):

            def hook(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.T @ x

            hooks.append(m.register_forward_pre_hook(hook))
    num_tokens = 0
    with torch.no_grad():
        for line in data.read_text().splitlines():
            row = json.loads(line)
            text = tokenizer.apply_chat_template(
                [{"role": r, "content": row[c]} for r, c in FORMATS[fmt]], tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
            assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # one BOS, not two
            model(input_ids=torch.tensor([ids]))
            num_tokens += len(ids)
    return {k: v / num_tokens for k, v in sums.items()}, num_tokens


def assert_grams_close(path, reference, rtol=2e-5):
    grams = GramFile(path)
    assert sorted(grams.modules()) == sorted(reference)
    for name, ref in reference.items():
        got = grams.get(name).double()
        err = (got - ref).abs().max() / ref.abs().max()
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def code_run(experts, calib_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("gram-code")
    return run(experts[0], calib_files["code"], out, "--batch-size", "4")


def test_gram_matches_float64_reference(code_run, experts, calib_files):
    reference, num_tokens = reference_grams(experts[0], calib_files["code"], "code")
    assert_grams_close(code_run, reference)
    meta = GramFile(code_run).metadata
    assert int(meta["num_tokens"]) == num_tokens
    assert meta["model"] == str(experts[0]) and meta["num_examples"] == "13" and meta["max_length"] == str(MAX_LENGTH)
    assert "lm_head" in GramFile(code_run).modules()
    assert not (code_run.parent / CHECKPOINT_FILE).exists()


def test_shared_inputs_stored_once(code_run):
    from safetensors import safe_open

    with safe_open(code_run, "pt") as f:
        keys, aliases = set(f.keys()), json.loads(f.metadata()["aliases"])
    expected = {}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.k_proj": p + "self_attn.q_proj",
            p + "self_attn.v_proj": p + "self_attn.q_proj",
            p + "mlp.up_proj": p + "mlp.gate_proj",
        }
    assert aliases == expected
    assert len(keys) == 2 * 4 + 1 and not keys & set(aliases)


def test_batch_size_and_order_invariance(code_run, experts, calib_files, tmp_path):
    """The same rows in batches of 1 and 13, and permuted (the batches are sorted by length, and rows
    of one length, the truncated ones, then sit in other batches and places): the same grams."""
    first = GramFile(code_run)
    rows = [json.loads(line) for line in calib_files["code"].read_text().splitlines()]
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", [rows[i] for i in (7, 2, 12, 0, 9, 4, 11, 1, 5, 10, 3, 8, 6)])
    runs = [(calib_files["code"], "1"), (calib_files["code"], "13"), (shuffled, "4")]
    for i, (data, batch_size) in enumerate(runs):
        other = GramFile(run(experts[0], data, tmp_path / f"run{i}", "--batch-size", batch_size))
        assert other.metadata["num_tokens"] == first.metadata["num_tokens"]
        for name in first.modules():
            a, b = first.get(name), other.get(name)
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), name


def test_qwen2_architecture(tokenizer, calib_files, tmp_path):
    """Another architecture (biases on q/k/v, tied embeddings): sharing found at run time."""
    base = tiny_qwen2(
        len(tokenizer), seed=1, intermediate_size=224, num_attention_heads=8, max_position_embeddings=32768
    )
    model_dir = save_expert(base, tmp_path / "qwen2", tokenizer, seed=3)
    path = run(model_dir, calib_files["math"], tmp_path / "out", "--batch-size", "3", preset="toy-math")
    reference, _ = reference_grams(model_dir, calib_files["math"], "math")
    assert_grams_close(path, reference)
    aliases = json.loads(GramFile(path).metadata["aliases"])
    assert aliases["model.layers.1.self_attn.v_proj"] == "model.layers.1.self_attn.q_proj"
    assert aliases["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj" and len(aliases) == 6


def test_gram_accumulator_masks_rows_and_mirrors_blocks():
    """Gram.add with a padding mask over 600 columns (3 blocks of 200, not a power of two)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 600, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.4
    x[~mask] = 1e6  # padding rows: any value must be ignored
    gram = Gram(600, "cpu", blocks=3)
    gram.add(x[:2], mask[:2])
    gram.add(x[2], mask[2].nonzero().squeeze(1))
    rows = x[mask].double()
    expected = rows.T @ rows / len(rows)
    assert gram.num_rows == int(mask.sum())
    assert torch.allclose(gram.result().double(), expected, rtol=1e-5, atol=1e-5)


def test_resume_after_interruption(code_run, experts, calib_files, tmp_path):
    """Interrupt a real run once its first checkpoint is on disk; the same command resumes
    and gives the uninterrupted run's grams."""
    out = tmp_path / "resumed"
    argv = ("--batch-size", "4", "--checkpoint-every", "1")  # 13 rows: 4 batches
    checkpoint = out / CHECKPOINT_FILE
    decoder_calls, interrupted = [], []

    def interrupt(module, args):  # like Ctrl-C once, while the batch after the checkpoint runs
        if type(module).__name__ == "LlamaModel":
            decoder_calls.append(1)
            if checkpoint.exists() and not interrupted:
                interrupted.append(1)
                raise KeyboardInterrupt

    handle = nn.modules.module.register_module_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(experts[0], calib_files["code"], out, *argv)
        assert checkpoint.exists() and not (out / GRAM_FILE).exists()
        decoder_calls.clear()
        path = run(experts[0], calib_files["code"], out, *argv)
    finally:
        handle.remove()
    # shape probe (2 calls) + the 3 batches left, and a later checkpoint must not stop it
    assert len(decoder_calls) == 2 + 3
    assert not checkpoint.exists()
    first, resumed = GramFile(code_run), GramFile(path)
    assert resumed.metadata["num_tokens"] == first.metadata["num_tokens"]
    for name in first.modules():
        assert torch.allclose(first.get(name), resumed.get(name), rtol=1e-5, atol=1e-6), name


def test_checkpoint_with_other_settings_is_refused(experts, calib_files, tmp_path):
    """A checkpoint resumes only the run that made it: another model, other data (same file, one row
    changed), another max length or batch size is refused by name, and the checkpoint is kept."""
    out, data = tmp_path / "ckpt", tmp_path / "code.jsonl"
    shutil.copyfile(calib_files["code"], data)

    def interrupt(module, args):
        if type(module).__name__ == "LlamaModel" and (out / CHECKPOINT_FILE).exists():
            raise KeyboardInterrupt

    handle = nn.modules.module.register_module_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(experts[0], data, out, "--batch-size", "4", "--checkpoint-every", "1")
    finally:
        handle.remove()
    saved = (out / CHECKPOINT_FILE).read_bytes()
    rows = data.read_text().splitlines()
    changed = tmp_path / "changed" / "code.jsonl"
    changed.parent.mkdir()
    changed.write_text("\n".join(rows[:5] + [rows[5].replace("Write Python.", "Write Python 3.")] + rows[6:]) + "\n")
    cases = [
        ((experts[1], data, "--batch-size", "4"), f"model: {str(experts[0])!r} there, {str(experts[1])!r} now"),
        ((experts[0], data, "--batch-size", "5"), "batch_size: 4 there, 5 now"),
        ((experts[0], data, "--batch-size", "4", "--max-length", "100"), "max_length: 160 there, 100 now"),
    ]
    for args, needle in cases:
        with pytest.raises(UserError, match=f"was made with other settings \\(.*{re.escape(needle)}"):
            run(args[0], args[1], out, *args[2:])
    shutil.copyfile(changed, data)  # the same file name, one row changed: only the tokens' fingerprint tells
    with pytest.raises(UserError, match=r"other settings \(data_sha256: '[0-9a-f]{64}' there, '[0-9a-f]{64}' now\)"):
        run(experts[0], data, out, "--batch-size", "4")
    assert (out / CHECKPOINT_FILE).read_bytes() == saved and not (out / GRAM_FILE).exists()


# ----------------------------------------------------------------------------- bad input
def test_bad_input_exits_with_one_line(experts, calib_files, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "compute_gram.py"),
        "toy-code",
        "--model",
        str(experts[0]),
        "--dataset",
        str(calib_files["code"]),
        "--output-dir",
        str(out),
        "--max-length",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--max-length must be >= 1" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["no-model", "no-dataset", "missing-columns", "empty-split", "zero-batch"])
def test_bad_input_is_refused(case, experts, calib_files, tmp_path):
    model, data, extra = experts[0], calib_files["code"], []
    if case == "no-model":
        model, match = tmp_path / "nope" / "model", "neither a folder nor a hub id"
    elif case == "no-dataset":
        data, match = tmp_path / "nope.jsonl", r"dataset file .*nope\.jsonl does not exist"
    elif case == "missing-columns":
        data, match = calib_files["math"], r"lack column\(s\) \['input', 'instruction', 'output'\]"
    elif case == "empty-split":
        data, match = write_jsonl(tmp_path / "empty.jsonl", []), r"dataset file .*empty\.jsonl is empty: no rows$"
    else:
        extra, match = ["--batch-size", "0"], "--batch-size must be >= 1"
    with pytest.raises(UserError, match=match):
        run(model, data, tmp_path / "out", *extra)
    assert not (tmp_path / "out" / GRAM_FILE).exists()


def test_more_examples_than_exist(experts, tmp_path, capsys):
    data = write_jsonl(tmp_path / "few.jsonl", make_rows("code", 3, seed=5))
    path = run(experts[0], data, tmp_path / "out", "--num-examples", "50")
    assert "asked for 50 examples" in capsys.readouterr().err
    assert GramFile(path).metadata["num_examples"] == "3"


# ----------------------------------------------------------------------------- the seed's gram.pkl
def test_seed_pickle_is_read(tmp_path):
    grams = {"model.layers.0.self_attn.q_proj": torch.randn(4, 4), "lm_head": torch.randn(4, 4)}
    (tmp_path / "gram.pkl").write_bytes(pickle.dumps(grams))  # the seed wrote plain pickle.dump
    loaded = GramFile(tmp_path)
    assert sorted(loaded.modules()) == sorted(grams)
    assert all(torch.equal(loaded.get(k), v) for k, v in grams.items())


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "gram.pkl").write_bytes(pickle.dumps({"lm_head": torch.zeros(2, 2), "x": Payload()}))
    with pytest.raises(UserError, match="refusing to load"):
        GramFile(tmp_path)
    assert not marker.exists()


def test_error_texts_are_one_line_even_when_empty(tmp_path):
    assert first_line(ValueError("")) == "ValueError: "  # str(e).splitlines()[0] raises IndexError here
    assert first_line(RuntimeError(" \n ")) == "RuntimeError: "
    assert first_line(OSError("no such file\nTraceback ...")) == "OSError: no such file"
    empty, truncated, bad_arguments = b"", b"\x80\x02c", b"\x80\x02ccollections\nOrderedDict\n(I1\ntR."
    for data in (empty, truncated, bad_arguments):  # malformed pickles: one UserError line each, never a traceback
        (tmp_path / "gram.pkl").write_bytes(data)
        with pytest.raises(UserError, match=r"gram.pkl: not a gram pickle \(\w+Error: [^\n]*\)$"):
            GramFile(tmp_path / "gram.pkl")

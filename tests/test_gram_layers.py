"""compute_gram.py --plan layers (one decoder layer at a time on stored hidden states) against --plan model
and the float64 per-row reference, on four architectures and the real SmolLM2; auto's choice; data parallel
and resume with the layer plan; no preset needed for one's own expert."""

import json
import subprocess
import sys

import pytest
import torch
from test_gram import reference_grams
from test_gram_distributed import assert_same_grams, launch

from compute_gram import main
from conftest import ROOT, save_expert, tiny_gemma, tiny_mistral, tiny_qwen2
from regmean.layerwise import PARTS_DIR
from regmean.tensor_io import GramFile
from regmean.utils import GRAM_FILE, UserError

MAX_LENGTH = 96  # the code rows run 84-246 tokens: some truncated, the rest padded in their batch
TOL = 1e-5


def gram(model_dir, data, out_dir, *extra):
    """compute_gram.py on one's own expert (no preset), float32 forward passes on the cpu."""
    argv = ["--model", str(model_dir), "--dataset", str(data), "--format", "code", "--output-dir", str(out_dir)]
    argv += ["--max-length", str(MAX_LENGTH), "--batch-size", "4", "--device", "cpu", "--dtype", "float32"]
    return main(argv + [str(x) for x in extra])


def assert_close_to(path, reference, tol=TOL):
    """Every stored gram (aliases resolved by GramFile) within tol · max|reference| of the float64 one."""
    got = GramFile(path)
    assert sorted(got.modules()) == sorted(reference)
    for name, ref in reference.items():
        err = (got.get(name).double() - ref).abs().max() / ref.abs().max()
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def architectures(experts, tokenizer, tmp_path_factory):
    """Tiny Llama (GQA), Mistral (sliding window), Qwen2 (biases, tied head), Gemma (scaled embeddings)."""
    d = tmp_path_factory.mktemp("arch")
    n = len(tokenizer)
    return {
        "llama": experts[0],
        "mistral": save_expert(tiny_mistral(n), d / "mistral", tokenizer, 40),
        "qwen2": save_expert(tiny_qwen2(n), d / "qwen2", tokenizer, 41),
        "gemma": save_expert(tiny_gemma(n), d / "gemma", tokenizer, 42),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_layer_plan_equals_model_plan_and_float64(arch, architectures, calib_files, tmp_path):
    model_dir = architectures[arch]
    layers = gram(model_dir, calib_files["code"], tmp_path / "layers", "--plan", "layers")
    model = gram(model_dir, calib_files["code"], tmp_path / "model", "--plan", "model")
    reference, num_tokens = reference_grams(model_dir, calib_files["code"], "code", MAX_LENGTH)
    assert_close_to(layers, reference)
    assert_close_to(model, reference)
    assert_same_grams(layers, model, rtol=TOL)  # same keys, aliases, token count and values
    a, b = GramFile(layers).metadata, GramFile(model).metadata
    assert a == b and int(a["num_tokens"]) == num_tokens  # the same provenance either way
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == [GRAM_FILE]  # nothing left behind


def test_smollm2_layer_plan_equals_model_plan_and_float64(smollm2_dir, calib_files, tmp_path):
    """The real pretrained SmolLM2-135M-Instruct (30 layers, tied embeddings, ChatML without BOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in calib_files["code"].read_text().splitlines()][:2]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    layers = gram(smollm2_dir, data, tmp_path / "layers", "--plan", "layers", "--max-length", 24)
    model = gram(smollm2_dir, data, tmp_path / "model", "--plan", "model", "--max-length", 24)
    assert_same_grams(layers, model, rtol=TOL)

    # float64 reference, one row at a time: every nn.Linear's input, lm_head's included
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64)
    sums, n = {}, 0

    def hook(module, args, name):
        x = args[0].reshape(-1, args[0].shape[-1])
        sums[name] = sums.get(name, 0) + x.T @ x

    for name, m in ref_model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda module, args, name=name: hook(module, args, name))
    with torch.no_grad():
        for row in rows:
            turns = [("system", "instruction"), ("user", "input"), ("assistant", "output")]
            text = tokenizer.apply_chat_template([{"role": r, "content": row[c]} for r, c in turns], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:24]
            ref_model(input_ids=torch.tensor([ids]))
            n += len(ids)
    assert_close_to(layers, {k: v / n for k, v in sums.items()})


def test_auto_takes_the_model_plan_when_it_fits_and_says_why(experts, calib_files, tmp_path, capsys):
    gram(experts[0], calib_files["code"], tmp_path / "auto")
    err = capsys.readouterr().err
    assert "plan: model (the whole model needs weights" in err and ": fits)" in err


def test_auto_takes_the_layer_plan_when_the_model_does_not_fit(experts, calib_files, tmp_path, monkeypatch, capsys):
    """Memory as an 8B expert meets it on a small machine: the host seems to have 64 KiB available."""
    from regmean import layerwise

    monkeypatch.setattr(layerwise, "host_available", lambda: 2**16)
    path = gram(experts[0], calib_files["code"], tmp_path / "auto")
    err = capsys.readouterr().err
    assert "plan: layers (the whole model needs weights" in err and "does not fit)" in err
    assert "hidden states: " in err and "kept on disk" in err  # over half of 64 KiB: spilled to disk
    reference, _ = reference_grams(experts[0], calib_files["code"], "code", MAX_LENGTH)
    assert_close_to(path, reference)
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == [GRAM_FILE]  # spill and parts removed


def interrupted_after_layer_0(out, layer_grams):
    """layer_grams that raises KeyboardInterrupt (like Ctrl-C) once layer 0's part file is in OUT's parts folder."""

    def interrupted(*args, **kwargs):
        if (out / PARTS_DIR / "layer-00000.safetensors").exists():
            raise KeyboardInterrupt
        return layer_grams(*args, **kwargs)

    return interrupted


def test_layer_plan_resumes_after_the_last_finished_layer(experts, calib_files, tmp_path, monkeypatch, capsys):
    """Interrupted while layer 1 runs: layer 0's grams are on disk; the same command (--checkpoint-every)
    continues from layer 1 (layer 0 only moves the hidden states on) and gives the uninterrupted grams."""
    from regmean import layerwise

    out = tmp_path / "resumed"
    real = layerwise.layer_grams
    monkeypatch.setattr(layerwise, "layer_grams", interrupted_after_layer_0(out, real))
    with pytest.raises(KeyboardInterrupt):
        gram(experts[0], calib_files["code"], out, "--plan", "layers", "--checkpoint-every", "1")
    assert not (out / GRAM_FILE).exists()
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == ["layer-00000.safetensors"]

    # other settings: refused by name, the finished layer kept
    with pytest.raises(UserError, match="other settings .*max_length"):
        gram(experts[0], calib_files["code"], out, "--plan", "layers", "--checkpoint-every", "1", "--max-length", 90)
    assert (out / PARTS_DIR / "layer-00000.safetensors").exists()

    calls = []
    monkeypatch.setattr(layerwise, "layer_grams", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    path = gram(experts[0], calib_files["code"], out, "--checkpoint-every", "1")  # auto keeps the plan it resumes
    assert "plan: layers (the plan of the run it resumes)" in capsys.readouterr().err
    assert len(calls) == 1  # layer 1 only
    reference, _ = reference_grams(experts[0], calib_files["code"], "code", MAX_LENGTH)
    assert_close_to(path, reference)
    assert sorted(p.name for p in out.iterdir()) == [GRAM_FILE]


def test_two_processes_with_the_layer_plan(experts, calib_files, tmp_path):
    """2 processes (gloo): each runs its batches through every layer, the sums are all-reduced layer by layer."""
    single = gram(experts[0], calib_files["code"], tmp_path / "single", "--plan", "layers")
    out = tmp_path / "two"
    args = ["--model", str(experts[0]), "--dataset", str(calib_files["code"]), "--format", "code"]
    args += ["--output-dir", str(out), "--max-length", str(MAX_LENGTH), "--batch-size", "2", "--device", "cpu"]
    args += ["--dtype", "float32", "--plan", "layers"]
    proc = launch(2, ROOT / "compute_gram.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by the layers plan over 2 processes" in proc.stdout
    assert_same_grams(out / GRAM_FILE, single, rtol=TOL)
    assert sorted(p.name for p in out.iterdir()) == [GRAM_FILE]


def test_no_preset_needed_with_model_dataset_and_format(experts, calib_files, tmp_path):
    """Issue 25: one's own expert needs no preset (the grams go to runs/grams/FOLDER_NAME); without one,
    the error names the presets and what to give instead."""
    own = ["--model", str(experts[0]), "--dataset", str(calib_files["code"])]
    rest = ["--max-length", "32", "--num-examples", "2", "--device", "cpu", "--dtype", "float32"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

    def cli(*args):
        cmd = [sys.executable, str(ROOT / "compute_gram.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    done = cli(*own, "--format", "code", *rest)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "grams" / experts[0].name / GRAM_FILE).exists()
    missing = cli(*own, *rest)
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert "give a preset (code, math," in last and "--format {code,math}" in last and "missing: --format" in last

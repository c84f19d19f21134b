"""What merge_model.py takes besides experts and grams: gram files bound to their model (swaps and
foreign grams refused), recipe files (and the round trip through a merged model card),
--exclude, and experts whose vocabularies nest (tokens added at the end)."""

import copy
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from test_merge import (
    assert_correction_close,
    calibration_grams,
    read_folder,
    reference_regmean,
    write_seed_pickle,
)

import compute_gram
import merge_model
from conftest import ROOT, save_expert, tiny_config
from regmean import solver, tensor_io
from regmean.tensor_io import GramFile, checkpoint_files, model_fingerprint
from regmean.utils import UserError


def run(*args):
    return merge_model.main([str(a) for a in args])


def gram_of(expert, calib_file, fmt, out_dir):
    """The real compute_gram.py on one expert."""
    args = ["toy-code", "--model", expert, "--dataset", calib_file, "--format", fmt, "--output-dir", out_dir]
    return compute_gram.main([str(a) for a in args + ["--max-length", 64, "--batch-size", 4, "--device", "cpu"]])


@pytest.fixture(scope="module")
def calib(experts, calib_files, tokenizer, tmp_path_factory):
    return calibration_grams(experts, calib_files, tokenizer, tmp_path_factory.mktemp("grams"))


@pytest.fixture(scope="module")
def grams(experts, calib_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("bound-grams")
    return [gram_of(e, calib_files[k], k, d / k) for e, k in zip(experts, ["code", "math"])]


# ----------------------------------------------------------------------------- 1. grams bound to their model
def test_fingerprint_covers_weights_not_sharding(experts, base_model, tokenizer, tmp_path):
    files = checkpoint_files(experts[0])
    fp = model_fingerprint(files)
    assert fp.startswith("sampled-v1:") and fp != model_fingerprint(checkpoint_files(experts[1]))
    sharded = save_expert(base_model, tmp_path / "sharded", tokenizer, seed=10, max_shard_size="60KB")
    assert len(set(checkpoint_files(sharded).values())) > 1
    assert model_fingerprint(checkpoint_files(sharded)) == fp  # same weights, other shards

    def changed(name, index):
        """The expert with one element of one tensor changed."""
        out = tmp_path / f"changed-{name}-{index}"
        shutil.copytree(experts[0], out)
        tensors = read_folder(out)
        tensors[name].view(-1)[index] += 1.0
        tensor_io.write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
        return model_fingerprint(checkpoint_files(out))

    small = "model.layers.0.input_layernorm.weight"  # 64 floats: hashed whole
    large = "model.embed_tokens.weight"  # 400 x 64 floats (100 KiB): 16 windows of 4 KiB
    assert changed(small, 17) != fp
    assert changed(large, 0) != fp and changed(large, 400 * 64 - 1) != fp  # first and last bytes are sampled
    # The documented limit: a change confined to bytes between the windows goes unseen.
    gap = (tensor_io.FINGERPRINT_WINDOW + 64) // 4  # just past the first window
    assert changed(large, gap) == fp


def test_gram_metadata_binds_model_config_and_data(experts, grams, calib_files):
    meta = GramFile(grams[0]).metadata
    assert meta["model_fingerprint"] == model_fingerprint(checkpoint_files(experts[0]))
    config = json.loads((experts[0] / "config.json").read_text())
    assert meta["config_sha256"] == tensor_io.config_fingerprint(config)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["data_sha256"])
    assert meta["data_sha256"] != GramFile(grams[1]).metadata["data_sha256"]


def test_swapped_or_foreign_grams_are_refused(experts, grams, base_model, tokenizer, tmp_path, capsys):
    base = ["regmean", "--models", *experts]
    with pytest.raises(UserError) as e:
        run(*base, "--grams", grams[1], grams[0], "--output-dir", tmp_path / "swapped")
    msg = str(e.value)
    assert "\n" not in msg and str(grams[1]) in msg and str(experts[0]) in msg
    assert f"matches model 2, {experts[1]}" in msg and "another order" in msg and "--allow-gram-mismatch" in msg
    other = save_expert(base_model, tmp_path / "other", tokenizer, seed=99)  # same shapes, other weights
    with pytest.raises(UserError, match="the weights differ"):
        run("regmean", "--models", experts[0], other, "--grams", *grams, "--output-dir", tmp_path / "foreign")
    edited = tmp_path / "edited"  # same weights, another config
    shutil.copytree(experts[1], edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(dict(config, rope_theta=1234.0)))
    with pytest.raises(UserError, match="the config differ"):
        run("regmean", "--models", experts[0], edited, "--grams", *grams, "--output-dir", tmp_path / "edited-out")
    assert not [p for p in tmp_path.iterdir() if "out" in p.name or p.name in ("swapped", "foreign")]
    # Knowingly: merged, with a warning in the log.
    capsys.readouterr()
    out = run(*base, "--grams", grams[1], grams[0], "--allow-gram-mismatch", "--output-dir", tmp_path / "allowed")
    assert "merging anyway" in capsys.readouterr().err and (out / "model.safetensors").exists()
    assert "allow_gram_mismatch: true" in (out / "README.md").read_text()


def test_right_order_and_seed_pickle_are_accepted(experts, grams, tmp_path, capsys):
    run("regmean", "--models", *experts, "--grams", *grams, "--output-dir", tmp_path / "ok")
    assert "fingerprint" not in capsys.readouterr().err
    pickles = []
    for i, g in enumerate(grams):
        f = GramFile(g)
        pickles.append(tmp_path / f"g{i}.pkl")
        torch.save({m: f.get(m) for m in f.modules()}, pickles[-1])
    out = run("regmean", "--models", *experts, "--grams", *pickles, "--output-dir", tmp_path / "pkl")
    err = capsys.readouterr().err
    assert err.count("records no model fingerprint: not checked") == 2 and "reference release" in err
    a, b = read_folder(tmp_path / "ok"), read_folder(out)
    for k in a:  # one factorization per module instead of per shared input: float rounding apart
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- 2. recipe files
def write_yaml(path, recipe):
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_recipe_equals_command_line_and_options_override_it(experts, grams, tmp_path):
    recipe = dict(
        merge_method="regmean",
        models=[dict(model=str(e), grams=str(g), weight=w) for e, g, w in zip(experts, grams, [1, 3])],
        parameters=dict(alpha=0.5, exclude=["lm_head"]),
        dtype="bfloat16",
    )
    cfg = write_yaml(tmp_path / "recipe.yml", recipe)
    by_file = read_folder(run("--config", cfg, "--output-dir", tmp_path / "file"))
    cli = ["regmean", "--models", *experts, "--grams", *grams, "--weights", 1, 3, "--alpha", 0.5]
    by_cli = read_folder(run(*cli, "--exclude", "lm_head", "--dtype", "bfloat16", "--output-dir", tmp_path / "cli"))
    assert by_file.keys() == by_cli.keys() and all(torch.equal(by_file[k], by_cli[k]) for k in by_file)
    assert by_file["lm_head.weight"].dtype == torch.bfloat16
    # mergekit's spelling of a model's weight is read too
    recipe["models"] = [
        dict(model=m["model"], grams=m["grams"], parameters=dict(weight=m["weight"])) for m in recipe["models"]
    ]
    mk = read_folder(run("--config", write_yaml(tmp_path / "mk.yml", recipe), "--output-dir", tmp_path / "mk"))
    assert all(torch.equal(mk[k], by_cli[k]) for k in by_cli)
    # An option given beats the file; what is not given still comes from the file.
    out = run("--config", cfg, "--alpha", 0.1, "--dtype", "float32", "--output-dir", tmp_path / "override")
    settings = json.loads((out / "merge_report.json").read_text())["settings"]
    assert settings["alpha"] == 0.1 and settings["dtype"] == "float32"
    assert settings["weights"] == [1.0, 3.0] and settings["exclude"] == ["lm_head"]
    assert settings["config"] == str(cfg)


def test_recipe_round_trip_from_the_model_card(experts, grams, tmp_path):
    out = run(
        "regmean",
        "--models",
        *experts,
        "--grams",
        *grams,
        "--weights",
        2,
        1,
        "--alpha",
        0.3,
        "--exclude",
        r"layers\.1\.mlp",
        "--output-dir",
        tmp_path / "first",
    )
    card = (out / "README.md").read_text()
    block = re.search(r"## Recipe\n.*?```yaml\n(.*?)```", card, re.S).group(1)  # written out plainly here
    recipe = yaml.safe_load(block)
    assert recipe["merge_method"] == "regmean" and recipe["parameters"] == dict(alpha=0.3, exclude=[r"layers\.1\.mlp"])
    assert [m["weight"] for m in recipe["models"]] == [2.0, 1.0] and recipe["dtype"] == "float32"
    assert [m["grams"] for m in recipe["models"]] == [str(g) for g in grams]
    first = read_folder(out)
    for i, cfg in enumerate([write_yaml(tmp_path / "extracted.yml", recipe), out / "README.md"]):
        again = read_folder(run("--config", cfg, "--output-dir", tmp_path / f"again{i}"))
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    avg = run("avg", "--models", *experts, "--output-dir", tmp_path / "avg")
    again = read_folder(run("--config", avg / "README.md", "--output-dir", tmp_path / "avg-again"))
    assert all(torch.equal(again[k], v) for k, v in read_folder(avg).items())


def test_bad_recipes_are_refused(experts, grams, tmp_path):
    models = [dict(model=str(e), grams=str(g)) for e, g in zip(experts, grams)]
    cases = {
        "unknown top key": (dict(merge_method="regmean", models=models, base_model="x"), "base_model"),
        "unknown parameter": (dict(merge_method="regmean", models=models, parameters=dict(lambda_=1)), "lambda_"),
        "half the grams": (dict(merge_method="regmean", models=[models[0], dict(model=str(experts[1]))]), "grams"),
        "alpha type": (dict(merge_method="regmean", models=models, parameters=dict(alpha="big")), "alpha"),
        "method": (dict(merge_method="ties", models=models), "merge_method"),
    }
    for recipe, needle in cases.values():
        with pytest.raises(UserError, match=needle):
            run("--config", write_yaml(tmp_path / "r.yml", recipe), "--output-dir", tmp_path / "out")
    (tmp_path / "broken.yml").write_text("models: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        run("--config", tmp_path / "broken.yml", "--output-dir", tmp_path / "out")
    with pytest.raises(SystemExit):  # no method anywhere
        run("--config", write_yaml(tmp_path / "nomethod.yml", dict(models=models)), "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. exclusions
def test_excluded_layers_are_averaged_and_reported(experts, grams, tmp_path, capsys):
    out = run(
        "regmean",
        "--models",
        *experts,
        "--grams",
        *grams,
        "--exclude",
        "lm_head",
        "--exclude",
        r"layers\.0\.self_attn\.k_proj",
        "--output-dir",
        tmp_path / "m",
    )
    log = capsys.readouterr().out
    excluded = ["model.layers.0.self_attn.k_proj", "lm_head"]
    assert "excluded from regmean (averaged)" in log and all(m in log for m in excluded)
    merged, ws = read_folder(out), [read_folder(e) for e in experts]
    gram_files = [GramFile(g) for g in grams]
    for name, w in merged.items():
        mean = (ws[0][name] + ws[1][name]) / 2
        if name.removesuffix(".weight") in excluded or w.ndim < 2 or "embed" in name:
            assert torch.equal(w, mean), name
        else:  # solved, q and v of the excluded k's group included: the correction to the mean, to 1e-4
            module, pair = name.removesuffix(".weight"), [ws[0][name], ws[1][name]]
            ref = reference_regmean(pair, [g.get(module) for g in gram_files], 0.1, [0.5, 0.5])
            assert_correction_close(w, ref, pair, [0.5, 0.5], 1e-4, name)
    report = json.loads((out / "merge_report.json").read_text())
    assert sorted(report["excluded"]["modules"]) == sorted(excluded)
    assert not {r["tensor"] for r in report["layers"]} & {m + ".weight" for m in excluded}
    assert "model.layers.0.self_attn.q_proj.weight" in {r["tensor"] for r in report["layers"]}
    card = (out / "README.md").read_text()
    assert "Excluded from regmean (the weighted mean instead), matching `lm_head`" in card
    line = next(x for x in card.splitlines() if x.startswith("Excluded from"))
    assert all(m in line for m in excluded)


def test_exclude_matching_nothing_is_an_error(experts, grams, tmp_path):
    base = ["regmean", "--models", *experts, "--grams", *grams, "--output-dir", tmp_path / "m"]
    with pytest.raises(UserError, match="'lm_haed' matches no linear layer"):
        run(*base, "--exclude", "lm_head", "--exclude", "lm_haed")
    with pytest.raises(UserError, match="not a regular expression"):
        run(*base, "--exclude", "(")
    with pytest.raises(UserError, match="--exclude is for regmean"):
        run("avg", "--models", *experts, "--exclude", "lm_head", "--output-dir", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_exclude_with_regmean_pp(experts, calib_files, tmp_path):
    common = ["regmean++", "--models", *experts, "--datasets", calib_files["code"], calib_files["math"]]
    common += ["--formats", "code", "math", "--max-length", 64, "--batch-size", 4, "--device", "cpu"]
    out = run(*common, "--exclude", r"layers\.1\.mlp\.down_proj", "--output-dir", tmp_path / "pp")
    merged, ws = read_folder(out), [read_folder(e) for e in experts]
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(merged[name], (ws[0][name] + ws[1][name]) / 2)
    report = json.loads((out / "merge_report.json").read_text())
    assert name not in {r["tensor"] for r in report["layers"]} and len(report["layers"]) == 2 * 7 - 1 + 1


# ----------------------------------------------------------------------------- 4. added tokens
@pytest.fixture(scope="module")
def grown(base_model, tokenizer, calib_files, tmp_path_factory):
    """Two experts of the base whose vocabularies grew by 2 and 5 tokens (the first 2 the same),
    their real grams, and a third whose 2 added tokens are other strings."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("grown")
    tokenizer.save_pretrained(str(d / "base-tok"))
    out = {}
    for name, added, seed in [
        ("two", ["<tool>", "<call>"], 30),
        ("five", ["<tool>", "<call>", "<a>", "<b>", "<c>"], 31),
        ("other", ["<call>", "<tool>"], 32),
    ]:
        tok = AutoTokenizer.from_pretrained(str(d / "base-tok"))
        tok.add_tokens(added)
        model = copy.deepcopy(base_model)  # resizing rewrites the config: not the shared fixture's
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():  # the new rows, distinct per expert
            g = torch.Generator().manual_seed(seed)
            for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
                w[len(tokenizer) :] = torch.randn(len(added), w.shape[1], generator=g) * 0.02
        out[name] = save_expert(model, d / name, tok, seed)
    out["grams"] = [gram_of(out[n], calib_files[k], k, d / f"g-{n}") for n, k in [("two", "code"), ("five", "math")]]
    return out


def test_added_tokens_are_merged_loaded_and_generate(grown, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n = len(tokenizer)
    two, five = read_folder(grown["two"]), read_folder(grown["five"])
    assert two["lm_head.weight"].shape[0] == n + 2 and five["lm_head.weight"].shape[0] == n + 5
    out = run(
        "regmean",
        "--models",
        grown["five"],
        grown["two"],
        "--grams",
        *grown["grams"][::-1],
        "--output-dir",
        tmp_path / "m",
    )
    assert f"config and tokenizer from {grown['five']}" in capsys.readouterr().out
    merged = read_folder(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == five[name].shape
        assert torch.equal(merged[name][n + 2 :], five[name][n + 2 :]), name  # only "five" has these
    emb = "model.embed_tokens.weight"
    assert torch.equal(merged[emb][: n + 2], (five[emb][: n + 2] + two[emb]) / 2)
    # lm_head: the rows both have are RegMean over both, in float64 here
    g = [GramFile(p) for p in grown["grams"][::-1]]
    ref = reference_regmean(
        [five["lm_head.weight"][: n + 2], two["lm_head.weight"]], [x.get("lm_head") for x in g], 0.1, [0.5, 0.5]
    )
    # the correction to the mean is checked (it is 0.2-0.8% of the weight: a check of the weight would hide it)
    pair = [five["lm_head.weight"][: n + 2], two["lm_head.weight"]]
    assert_correction_close(merged["lm_head.weight"][: n + 2], ref, pair, [0.5, 0.5], 1e-4, "lm_head")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n + 5
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == n + 5 and tok.convert_ids_to_tokens(n + 4) == "<c>"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert all(torch.equal(p, merged[k]) for k, p in model.state_dict().items())
    ids = tok("<tool> x = 1 <c>", return_tensors="pt")
    assert ids["input_ids"][0, -1].item() == n + 4
    gen = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    # avg: the same rule, the plain mean where both have rows
    avg = read_folder(run("avg", "--models", grown["two"], grown["five"], "--output-dir", tmp_path / "avg"))
    assert torch.equal(avg["lm_head.weight"][: n + 2], (two["lm_head.weight"] + five["lm_head.weight"][: n + 2]) / 2)
    assert torch.equal(avg["lm_head.weight"][n + 2 :], five["lm_head.weight"][n + 2 :])


def test_vocabularies_that_do_not_nest_are_refused(grown, experts, tmp_path):
    with pytest.raises(UserError, match="vocabularies do not nest: token 400 is '<call>'"):
        run("avg", "--models", grown["other"], grown["five"], "--output-dir", tmp_path / "m")
    liar = tmp_path / "liar"  # 400 rows, but a config that claims 402: not tokens added, a shape mismatch
    shutil.copytree(experts[0], liar)
    config = json.loads((liar / "config.json").read_text())
    (liar / "config.json").write_text(json.dumps(dict(config, vocab_size=402)))
    with pytest.raises(UserError, match=r"tensor \S+ has shape \[402, 64\] in \S+two but \[400, 64\]"):
        run("avg", "--models", grown["two"], liar, "--output-dir", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_added_tokens_with_regmean_pp(grown, calib_files, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    n = len(tokenizer)
    common = ["regmean++", "--models", grown["two"], grown["five"], "--datasets", calib_files["code"]]
    common += [calib_files["math"], "--formats", "code", "math", "--max-length", 64, "--batch-size", 4]
    out = run(*common, "--device", "cpu", "--output-dir", tmp_path / "pp")
    merged, five = read_folder(out), read_folder(grown["five"])
    assert torch.equal(merged["lm_head.weight"][n + 2 :], five["lm_head.weight"][n + 2 :])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    gen = model.generate(torch.tensor([[1, n + 4]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 5)


def test_help_shows_the_new_options(capsys):
    with pytest.raises(SystemExit) as e:
        merge_model.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--config CONFIG" in text and "--exclude REGEX" in text and "--allow-gram-mismatch" in text
    assert "options given override them" in text


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_refused_with_nothing_written(experts, calib, base_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    st = [calib[0]["st"], calib[1]["st"]]
    g0 = calib[0]["grams"]
    wrong_shape = dict(g0, **{"model.layers.0.mlp.down_proj": torch.eye(7)})
    nan = dict(
        g0, **{"model.layers.1.self_attn.o_proj": g0["model.layers.1.self_attn.o_proj"].clone().fill_(float("nan"))}
    )
    missing = {k: v for k, v in g0.items() if k != "model.layers.1.mlp.up_proj"}
    other_size = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), intermediate_size=192))
    other_depth = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), num_hidden_layers=1))
    other_arch = tmp_path / "arch"
    shutil.copytree(experts[1], other_arch)
    config = json.loads((other_arch / "config.json").read_text())
    (other_arch / "config.json").write_text(
        json.dumps(dict(config, model_type="mistral", architectures=["MistralForCausalLM"]))
    )
    exists = tmp_path / "exists"
    exists.mkdir()
    o1, o2 = (
        save_expert(other_size, tmp_path / "o1", tokenizer, 1),
        save_expert(other_depth, tmp_path / "o2", tokenizer, 1),
    )
    cases = {  # each message in full, or its telling part
        "architecture": (
            ["--models", experts[0], other_arch],
            f"models differ in model_type: {experts[0]} has llama, {other_arch} has mistral",
        ),
        "shape": (
            ["--models", experts[0], o1],
            f"tensor model.layers.0.mlp.down_proj.weight has shape [64, 224] in {experts[0]} but [64, 192] in {o1}",
        ),
        "names": (
            ["--models", experts[0], o2],
            f"tensor model.layers.1.input_layernorm.weight is in {experts[0]} only; all models must have the same",
        ),
        "gram shape": (
            ["--grams", st[0], write_seed_pickle(tmp_path / "ws.pkl", wrong_shape)],
            "ws.pkl: gram of model.layers.0.mlp.down_proj has shape [7, 7], expected [224, 224]",
        ),
        "gram nan": (
            ["--grams", st[0], write_seed_pickle(tmp_path / "nan.pkl", nan)],
            "nan.pkl: gram model.layers.1.self_attn.o_proj holds NaN or Inf",
        ),
        "gram missing": (
            ["--grams", st[0], write_seed_pickle(tmp_path / "mi.pkl", missing)],
            "mi.pkl has no gram for model.layers.1.mlp.up_proj (other gram files have one)",
        ),
        "gram file": (["--grams", st[0], tmp_path / "nowhere.pkl"], f"gram file {tmp_path}/nowhere.pkl does not exist"),
        "weights": (["--weights", 1, 2, 3], "--weights has 3 values for 2 models"),
        "grams count": (["--grams", st[0]], "--grams has 1 files for 2 models"),
        "one model": (["--models", experts[0], "--grams", st[0]], "--models needs at least 2 models, got 1"),
        "exists": (["--output-dir", exists], f"{exists} exists; pass --overwrite to replace it"),
        "shard size": (["--max-shard-size", "lots"], "--max-shard-size 'lots': "),
    }
    for case, (args, needle) in cases.items():
        args = [str(a) for a in args]
        full = (
            ["regmean"]
            + (["--models", *map(str, experts)] if "--models" not in args else [])
            + (["--grams", *map(str, st)] if "--grams" not in args else [])
            + args
        )
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        if "--output-dir" not in args:
            full += ["--output-dir", str(out)]
        with pytest.raises(UserError, match=re.escape(needle)):
            merge_model.main(full)
        assert not out.exists(), case
    assert not list(exists.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_interrupted_merge_leaves_nothing(experts, calib, tmp_path, monkeypatch):
    solve, calls = solver.RegMeanSystem.solve_deviation, []

    def interrupted(*args):  # the real solver, then an interruption halfway through the layers
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return solve(*args)

    monkeypatch.setattr(solver.RegMeanSystem, "solve_deviation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("regmean", "--models", *experts, "--grams", calib[0]["st"], calib[1]["st"], "--output-dir", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_malicious_pickle_is_refused_before_it_runs(experts, calib, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "gram.pkl"
    evil.write_bytes(pickle.dumps({"model.layers.0.mlp.down_proj": Exploit()}))
    out = tmp_path / "m"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "merge_model.py"),
            "regmean",
            "--models",
            *map(str, experts),
            "--grams",
            str(calib[0]["st"]),
            str(evil),
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "system" in proc.stderr, proc.stderr  # one line naming what was refused
    assert not marker.exists() and not out.exists()

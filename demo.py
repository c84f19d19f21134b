"""The whole pipeline, offline, on two toy experts that the demo builds itself.

    python demo.py            # builds runs/toy/ once (a few minutes on 2 CPU cores), then
                              # gram -> merge (avg, regmean 0.1, regmean 1.0, regmean++ 0.1) -> lm_eval -> table
    python demo.py --quick    # tiny sizes and few rows, into runs/toy-quick/: the same flow
    python demo.py --rebuild  # build the data, tokenizer and experts again

It prints the results table and writes runs/toy/results.md and runs/toy/results.png.

The toy world (all built locally, fixed seeds, CPU):
- toy-code: short Python programs on a list of digits (reverse, sort, max, ...); the expert
  replies with what the program prints. Rows {instruction, input, output} (format "code").
- toy-math: addition and subtraction word problems with two-digit numbers; the
  expert replies "a + b = c. The answer is c." Rows {question, answer} (format "math").
- a byte-level BPE tokenizer with Llama-3's special tokens and chat template, a tiny Llama
  base pre-trained on both domains, and two experts fine-tuned from it, each on its own
  domain only: runs/toy/toy-code and runs/toy/toy-math (regular Hugging Face folders).
- data: runs/toy/data/{code,math}_{train,calib,test}.jsonl; calibration rows (for the
  grams) and test rows (for lm_eval's toy_code / toy_math tasks) never appear in training.

The stages then run on them exactly as on the 8B experts (the toy-code / toy-math presets
point at runs/toy/), so after a demo this works too:

    python merge_model.py regmean --models toy-code toy-math --alpha 0.1
    python merge_model.py regmean++ --models toy-code toy-math --alpha 0.1
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

from calibration import format_rows, tokenize_texts
from utils import FORMATS, Timer, atomic_dir, merge_dir_name, peak_memory, run_main

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

# Sizes of the toy world. "full" is what `python demo.py` builds; "quick" only checks that
# the flow runs end to end (its experts learn little).
SIZES = {
    "full": dict(
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


# ----------------------------------------------------------------------------- training
def encode(tokenizer, rows, fmt, reply_only):
    """Rows -> (token ids, loss mask) pairs. reply_only: the loss sees the assistant's reply
    (and its <|eot_id|>) only, as in supervised fine-tuning; else every token after BOS."""
    texts = format_rows(rows, fmt, tokenizer)
    out = []
    for row, ids in zip(rows, tokenize_texts(tokenizer, texts, max_length=10_000)):
        if reply_only:
            messages = [{"role": role, "content": str(row[col])} for role, col in FORMATS[fmt][:-1]]
            n_prompt = len(
                tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            )
            mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        else:
            mask = [0] + [1] * (len(ids) - 1)
        out.append((ids, mask))
    return out


def train(model, examples, steps, batch_size, lr, seed, desc):
    """Plain AdamW with warm-up and cosine decay on padded batches of (ids, mask) examples.
    Returns the last loss and the number of (non-padding) tokens trained on."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False)
    tokens = 0
    for _ in bar:
        batch = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=g).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor(
            [[t if m else -100 for t, m in zip(i, mk)] + [-100] * (width - len(i)) for i, mk in batch]
        )
        attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        tokens += int(attention.sum())
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item(), tokens


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows, fmt, batch_size=64, max_new_tokens=32):
    """Exact-match accuracy of greedy replies (a quick check, independent of lm_eval)."""
    *prompt_turns, (_, answer_col) = FORMATS[fmt]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": r, "content": row[c]} for r, c in prompt_turns], tokenize=False, add_generation_prompt=True
            )
            for row in chunk
        ]
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(reply.strip() == row[answer_col].strip() for reply, row in zip(replies, chunk))
    tokenizer.padding_side = side
    return hits / len(rows)


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
    data_dir = root / "data"
    splits = {kind: make_splits(kind, sizes, seed=seed + i) for i, kind in enumerate(("code", "math"))}
    with atomic_dir(data_dir, overwrite=True) as tmp:
        for kind, by_split in splits.items():
            for split, rows in by_split.items():
                write_jsonl(tmp / f"{kind}_{split}.jsonl", rows)

    corpus = [json.dumps(r) for kind in splits for r in splits[kind]["train"]]
    tokenizer = build_tokenizer(corpus, root / "tokenizer", vocab_size=sizes["vocab_size"], split_digits=True)
    train_sets = {kind: encode(tokenizer, splits[kind]["train"], kind, reply_only=False) for kind in splits}

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
    for i, kind in enumerate(("code", "math")):
        name = f"toy-{kind}"
        model = base  # one model object, reset to the base weights before each expert
        model.load_state_dict(base_state)
        sft = encode(tokenizer, splits[kind]["train"], kind, reply_only=True)
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


def is_built(root):
    files = [
        root / "data" / f"{kind}_{split}.jsonl" for kind in ("code", "math") for split in ("train", "calib", "test")
    ]
    files += [
        root / name / f
        for name in ("toy-code", "toy-math")
        for f in ("config.json", "model.safetensors", "tokenizer.json")
    ]
    return all(f.is_file() for f in files)


# ----------------------------------------------------------------------------- the flow
TASKS = ["toy_code", "toy_math"]
# Columns of the results table: (title, metric label, lm_eval task, result keys).
COLUMNS = [
    ("toy-code", "exact match", "toy_code", ["exact_match,none"]),
    ("toy-math", "exact match", "toy_math", ["exact_match,none"]),
]


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Build two toy experts (once), then run compute_gram -> merge_model "
        "(avg, regmean 0.1, regmean 1.0, regmean++ 0.1) -> lm_eval on them, offline on the CPU."
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few rows (a smoke test of the flow; default root runs/toy-quick)",
    )
    p.add_argument(
        "--root",
        default=None,
        help="folder of the toy world and its results (default runs/toy, or runs/toy-quick with --quick)",
    )
    p.add_argument("--rebuild", action="store_true", help="build data, tokenizer and experts again even when present")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the training runs (default 0)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="lm_eval --batch_size (default 64)")
    args = p.parse_args(argv)

    # imported here: the tests import this module for build_tokenizer alone
    import compute_gram
    import evaluate
    import merge_model

    sizes = SIZES["quick" if args.quick else "full"]
    root = Path(args.root or ("runs/toy-quick" if args.quick else "runs/toy"))
    timer = Timer()

    with timer("build"):
        if args.rebuild or not is_built(root):
            build_toy(root, sizes, args.seed)
        else:
            print(f"reusing the toy experts in {root} (--rebuild builds them again)")
    experts = {name: root / name for name in ("toy-code", "toy-math")}

    with timer("gram"):
        grams = {}
        for name, folder in experts.items():
            kind = name.removeprefix("toy-")
            grams[name] = root / "grams" / name
            compute_gram.main(
                [
                    name,
                    "--model",
                    str(folder),
                    "--dataset",
                    str(root / "data" / f"{kind}_calib.jsonl"),
                    "--num-examples",
                    str(sizes["calib_rows"]),
                    "--output-dir",
                    str(grams[name]),
                    "--device",
                    "cpu",
                ]
            )

    merges = {
        "Average": ("avg", None),
        "RegMean (α=0.1)": ("regmean", 0.1),
        "RegMean (α=1.0)": ("regmean", 1.0),
        "RegMean++ (α=0.1)": ("regmean++", 0.1),
    }
    folders = {"Code expert": experts["toy-code"], "Math expert": experts["toy-math"]}
    with timer("merge"):
        for label, (method, alpha) in merges.items():
            out = root / "merges" / merge_dir_name(method, alpha)
            cmd = [
                method,
                "--models",
                *map(str, experts.values()),
                "--output-dir",
                str(out),
                "--overwrite",
                "--device",
                "cpu",
            ]
            if method == "regmean":
                cmd += ["--grams", *map(str, grams.values()), "--alpha", str(alpha)]
            elif method == "regmean++":  # the same calibration rows as the grams, through the merged layers
                cmd += [
                    "--datasets",
                    *(str(root / "data" / f"{kind}_calib.jsonl") for kind in ("code", "math")),
                    "--formats",
                    "code",
                    "math",
                    "--num-examples",
                    str(sizes["calib_rows"]),
                    "--alpha",
                    str(alpha),
                ]
            folders[label] = merge_model.main(cmd)

    # lm_eval runs as evaluate.py runs it, plus the chat template (the toy tasks are chat
    # turns) and the data folder of this toy world.
    with timer("evaluate"):
        device, dtype = torch.device("cpu"), torch.float32
        extra = [
            "--apply_chat_template",
            "--batch_size",
            str(args.eval_batch_size),
            "--metadata",
            json.dumps({"toy_data_dir": str((root / "data").resolve())}),
        ]
        for label, folder in folders.items():
            cmd = evaluate.lm_eval_command(folder, "hf", device, dtype, TASKS, None, "", extra)
            print(f"[{label}] {' '.join(cmd[2:])}", file=sys.stderr)
            evaluate.run_lm_eval(cmd, folder)
        table = evaluate.build_table(list(folders.items()), COLUMNS, output_dir=root, mean_column=True)

    print()
    print(table, end="")
    print(f"wrote {root / 'results.md'} and {root / 'results.png'}")
    print(
        f"demo wall time {timer.total():.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in timer.phases.items())
        + f"), {peak_memory()}"
    )
    return root / "results.md"


if __name__ == "__main__":
    run_main(main)

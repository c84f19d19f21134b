"""What bfloat16 forward passes cost in accuracy: grams of SmolLM2-135M-Instruct from bfloat16
forward passes against float32 ones (both against float64 ones), per module kind, and the
RegMean merge of SmolLM2 with a perturbed copy of itself made from each gram set.

    python bench/bench_bf16_accuracy.py                 # 32 rows of up to 128 tokens, ~5 min on 2 cores
    python bench/bench_bf16_accuracy.py --rows 64 --max-length 256

Calibration text is real text with no download: the code expert's rows are chunks of this
repository's Python files, the other's are paragraphs of its README and docs/. The second expert is
SmolLM2 with seeded noise (--noise x each tensor's std) on every linear weight. The grams are
compute_gram.py's own (calibration.Gram, float32 sums) from forward passes in float64, float32
and bfloat16 of the same weights (the bfloat16 model is the float32 one cast). The merge is
solver.merge_weight on every decoder linear layer; its difference is measured against the
RegMean correction (merged - average), which is what the grams decide.
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from regmean.calibration import format_rows, load_tokenizer, tokenize_texts  # noqa: E402
from regmean.model_plan import accumulate_grams  # noqa: E402
from regmean.solver import merge_weight  # noqa: E402


def calibration_rows(num_rows, seed=0):
    """(code rows, math rows) of real text from this repository: code chunks and documentation paragraphs."""
    rng = random.Random(seed)
    chunks = []
    for path in sorted(ROOT.glob("*.py")):
        lines = path.read_text().splitlines()
        chunks += ["\n".join(lines[i : i + 12]) for i in range(0, len(lines), 12)]
    pages = [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]  # the README alone is too short since docs/
    paragraphs = [p.strip() for page in pages for p in page.read_text().split("\n\n") if len(p.strip()) > 80]
    rng.shuffle(chunks)
    rng.shuffle(paragraphs)
    code = [
        {"instruction": "You write Python.", "input": f"Continue this code:\n{a}", "output": b}
        for a, b in zip(chunks[:num_rows], chunks[num_rows : 2 * num_rows])
    ]
    math = [{"question": f"Explain: {paragraphs[i]}", "answer": paragraphs[i + 1]} for i in range(num_rows)]
    return code, math[: len(paragraphs) - 1]


def load(model_dir, noise, seed):
    """SmolLM2 in float32, with noise * std added to every decoder linear weight when noise > 0."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."):
                    m.weight += noise * m.weight.std() * torch.randn(m.weight.shape, generator=g)
    return model


def grams_in(model, dtype, token_ids, batch_size):
    """{stored key: float32 gram}, aliases and seconds, from forward passes in `dtype`."""
    m = model.to(dtype)
    t = time.perf_counter()
    grams, aliases, _ = accumulate_grams(m, token_ids, batch_size, progress=False)
    seconds = time.perf_counter() - t
    model.to(torch.float32)
    return {k: g.result() for k, g in grams.items()}, aliases, seconds


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kind(name):
    return name.rsplit(".", 1)[-1]


def summary(values):
    return f"{statistics.median(values):.1e} / {max(values):.1e}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/models/SmolLM2-135M-Instruct")
    p.add_argument("--rows", type=int, default=32, help="calibration rows per expert")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.02, help="the second expert's perturbation, x each weight's std")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    code, math = calibration_rows(args.rows)
    tokens = [
        tokenize_texts(tokenizer, format_rows(code, "code", tokenizer), args.max_length),
        tokenize_texts(tokenizer, format_rows(math, "math", tokenizer), args.max_length),
    ]
    print(f"{args.model}: {[sum(map(len, t)) for t in tokens]} calibration tokens (code rows, README rows)")
    experts = [load(args.model, 0.0, 0), load(args.model, args.noise, 1)]

    grams = {}  # (expert, dtype) -> {key: gram}
    for e, (model, ids) in enumerate(zip(experts, tokens)):
        dtypes = [torch.float64, torch.float32, torch.bfloat16] if e == 0 else [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            grams[e, dtype], aliases, seconds = grams_in(model, dtype, ids, args.batch_size)
            print(f"expert {e}: grams from {str(dtype)[6:]} forward passes in {seconds:.1f} s")

    print("\ngram error, relative Frobenius, median / max over layers (expert 0, code rows):")
    print("| module kind (input of) | float32 passes vs float64 | bfloat16 passes vs float64 | bfloat16 vs float32 |")
    print("|---|---|---|---|")
    ref, f32, b16 = grams[0, torch.float64], grams[0, torch.float32], grams[0, torch.bfloat16]
    for k in sorted({kind(key) for key in ref}, key=list(map(kind, ref)).index):
        keys = [key for key in ref if kind(key) == k]
        readers = sorted({kind(m) for m, leader in aliases.items() if leader in keys} | {k})
        print(
            f"| {'/'.join(readers)} | {summary([rel(f32[x], ref[x]) for x in keys])} | "
            f"{summary([rel(b16[x], ref[x]) for x in keys])} | {summary([rel(b16[x], f32[x]) for x in keys])} |"
        )

    weights = [{n: m.weight.detach() for n, m in e.named_modules() if isinstance(m, torch.nn.Linear)} for e in experts]
    modules = [n for n in weights[0] if n.startswith("model.layers.")]
    for alpha in args.alphas:
        print(f"\nRegMean merge (alpha {alpha}) from bfloat16-pass grams against float32-pass grams, median / max:")
        print("| module | difference / the correction (merged - average) | difference / the weight |")
        print("|---|---|---|")
        by_kind = {}
        for name in modules:
            key = aliases.get(name, name)
            ws = [w[name] for w in weights]
            merged = {}
            for dtype in (torch.float32, torch.bfloat16):
                merged[dtype], _ = merge_weight(ws, [grams[e, dtype][key] for e in (0, 1)], alpha, [0.5, 0.5])
            avg = (ws[0] + ws[1]) / 2
            diff = (merged[torch.bfloat16] - merged[torch.float32]).double().norm()
            corr, whole = by_kind.setdefault(kind(name), ([], []))
            corr.append((diff / (merged[torch.float32] - avg).double().norm()).item())
            whole.append((diff / merged[torch.float32].double().norm()).item())
        for k, (corr, whole) in by_kind.items():
            print(f"| {k} | {summary(corr)} | {summary(whole)} |")


if __name__ == "__main__":
    main()

"""Merging LoRA adapters into one adapter (--output-format adapter) against the dense path, time and peak memory
(the figures: docs/merging.md's section on adapters).

    python bench/bench_lora.py smollm2      # two LoRA adapters of SmolLM2-135M-Instruct (ranks 16 and 8, every
                                            #   linear layer), grams on the demo's calibration rows, then
                                            #   merge_model.py regmean dense and adapter, each in its own process
    python bench/bench_lora.py layer        # one Llama-3-8B-shaped gate_proj (4096 -> 14336), ranks 16 and 16:
                                            #   the RegMean solve on W's 14336 rows against the adapter's 32 rows

Each variant runs in a fresh process, which prints its wall time and its own peak RSS.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_gib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss keeps the parent's from before it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_adapters(base: Path, out: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = []
    for seed, rank in ((1, 16), (2, 8)):
        path = out / f"lora-r{rank}"
        if not path.exists():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(0.01 * torch.randn(p.shape, generator=g))
            peft_model.peft_config["default"].base_model_name_or_path = str(base)
            peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def run(args: list[str]) -> dict:
    """One variant in a fresh process: its wall time and peak RSS."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(argv: list[str]) -> None:
    """A variant, inside its own process."""
    kind, rest = argv[0], argv[1:]
    t0 = time.perf_counter()
    if kind == "merge":
        import contextlib

        from merge_model import main

        with contextlib.redirect_stdout(sys.stderr):
            main(rest)
    elif kind == "layer":
        from regmean.solver import RegMeanSystem

        mode, n_in, n_out, rank = rest[0], 4096, 14336, 16
        g = torch.Generator().manual_seed(0)
        x = [torch.randn(2 * n_in, n_in, generator=g) for _ in range(2)]
        grams = [xi.T @ xi / len(xi) for xi in x]
        del x
        a = [torch.randn(rank, n_in, generator=g) / n_in**0.5 for _ in range(2)]
        b = [0.01 * torch.randn(n_out, rank, generator=g) for _ in range(2)]
        t0 = time.perf_counter()  # the inputs are not what is measured
        if mode == "dense":
            w0 = torch.randn(n_out, n_in, generator=g) / n_in**0.5
            system = RegMeanSystem.factor(grams, 0.1, [0.5, 0.5], "cpu", num_rows=n_out)
            system.solve([w0 + bi @ ai for ai, bi in zip(a, b)])
        else:
            system = RegMeanSystem.factor(grams, 0.1, [0.5, 0.5], "cpu", num_rows=2 * rank)
            rows = [torch.cat([a[0], torch.zeros_like(a[1])]), torch.cat([torch.zeros_like(a[0]), a[1]])]
            system.solve(rows)
    print(json.dumps(dict(seconds=round(time.perf_counter() - t0, 2), peak_rss_gib=round(peak_gib(), 3))))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--child":
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["smollm2", "layer"])
    p.add_argument("--out", default="runs/bench-lora")
    p.add_argument("--base", help="SmolLM2-135M-Instruct's folder (default: built by smollm2.py where it goes)")
    p.add_argument("--calib", default="runs/demo/data/code_calib.jsonl", help="calibration rows (code format)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.what == "layer":
        for mode in ("adapter", "dense"):
            print(f"8B-shaped gate_proj, {mode}: {run(['--child', 'layer', mode])}")
        return
    from regmean.grams import compute_grams
    from smollm2 import DEFAULT_DIR, materialize

    base = Path(args.base) if args.base else materialize(ROOT / DEFAULT_DIR)
    adapters = make_adapters(base, out)
    calib = Path(args.calib)
    grams = [out / f"grams-{a.name}" / "gram.safetensors" for a in adapters]
    for a, g in zip(adapters, grams):
        if not g.exists():
            compute_grams(a, calib, "code", g.parent, num_examples=16, max_length=128, dtype="float32")
    common = ["regmean", "--models", *map(str, adapters), "--grams", *map(str, grams), "--overwrite"]
    common += ["--error-sample-every", "0", "--device", "cpu"]
    for fmt in ("adapter", "dense"):
        figures = run(["--child", "merge", *common, "--output-format", fmt, "--output-dir", str(out / f"merged-{fmt}")])
        size = sum(f.stat().st_size for f in (out / f"merged-{fmt}").glob("*.safetensors")) / 2**20
        print(f"SmolLM2-135M, two adapters (ranks 16, 8) -> {fmt}: {figures}, weights {size:.1f} MiB")


if __name__ == "__main__":
    main()

"""Gram pass speed: compute_gram.py's accumulation against the seed's method, on the same
randomly initialised Llama-shaped model and the same token rows, in one run.

    python bench/bench_gram.py             # ~71M params with 8B proportions, 256 rows, batch 32, cpu float32
    python bench/bench_gram.py --quick     # a smoke run of the same flow, in seconds
    python bench/bench_gram.py --hidden 1024 --intermediate 3584 --layers 4 --dtype auto --lengths full \
        --decompose --repeat 2   # the checks' model, every row 256 tokens, the ratio taken apart
    python bench/bench_gram.py --hidden 1024 --intermediate 3584 --layers 4 --dtype auto \
        --reference-dtype bfloat16 --against-float32   # auto vs the seed in bfloat16 and vs our float32
    python bench/bench_gram.py --processes 2   # compute_gram in 1 vs 2 processes (gloo), same cores
    python bench/bench_gram.py --processes 8 --device cuda --dtype bfloat16   # 1 GPU vs 8 GPUs (nccl)
    python bench/bench_gram.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 14336 \
        --layers 2 --heads 32 --kv-heads 8 --vocab 128256   # an 8B-shaped slice on a GPU

The seed's method: a forward hook on every nn.Linear that keeps a float32 running mean of
xᵀx over all positions (padding included), one per module (q/k/v and gate/up computed
three and two times), batches padded in dataset order, logits computed; the forward passes
in the model's dtype (the seed ran them in bfloat16), xᵀx upcast to float32. This project's:
shared inputs computed once, padding rows dropped, batches sorted by length, upper
block-triangle products, no logits.

--lengths mixed draws each row's length uniformly in --min-length..--max-length (about half
of a dataset-order batch is padding); --lengths full makes every row --max-length tokens, as
the seed's data mostly are at 256 (long code and answers, truncated), so there is no padding.
--decompose adds the steps from the seed's method to this project's, each one change more
(float32 sum accumulator, padding rows dropped, length-sorted batches, shared inputs, upper
triangle; skipping the logits is the last step, compute_gram itself). Every method runs
--repeat times, the methods alternating; the best time of each is reported, all times shown.

Both figures count the same calibration tokens (padding excluded) per second. The share of
the matmul peak is the useful work (the linear layers on real tokens, without lm_head's
logits, plus one XᵀX per distinct input) per second, over the best `torch.mm` rate
measured in the same run, in the dtype of the run's forward passes (both peaks are shown).
"""

import argparse
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regmean.calibration import Gram, collate, find_shared_inputs, length_batches  # noqa: E402
from regmean.model_plan import accumulate_grams  # noqa: E402
from regmean.ranks import all_reduce_grams  # noqa: E402
from regmean.utils import DTYPES, auto_dtype, choose_device, dtype_name  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size")
    p.add_argument("--intermediate", type=int, default=1792, help="MLP size (3.5 x hidden, as in Llama-3-8B)")
    p.add_argument("--layers", type=int, default=16, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (4:1 grouped-query attention)")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary (about 31 x hidden, as in Llama-3-8B)")
    p.add_argument("--rows", type=int, default=256, help="calibration rows")
    p.add_argument("--min-length", type=int, default=4, help="shortest row, in tokens")
    p.add_argument("--max-length", type=int, default=256, help="longest row, in tokens")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", *sorted(DTYPES)],
        help="dtype of the forward passes (auto: compute_gram.py's choice for this device)",
    )
    p.add_argument(
        "--reference-dtype", choices=sorted(DTYPES), help="the seed's method in this dtype (default: --dtype)"
    )
    p.add_argument("--against-float32", action="store_true", help="also compute_gram in float32 (for --dtype auto)")
    p.add_argument("--lengths", choices=["mixed", "full"], default="mixed", help="row lengths (see above)")
    p.add_argument("--decompose", action="store_true", help="also the steps between the seed's method and ours")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each method, alternating")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the row lengths")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 small layers, 64 rows up to 128 tokens")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="N > 1: compute_gram's pass in 1 vs N processes instead of against the seed",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.rows, args.max_length = 256, 896, 2, 8192, 64, 128
    return args


def seed_method(model, token_ids, batch_size):
    """The seed's compute_gram: hooks on every nn.Linear, float32 running mean over all
    positions of padded, dataset-order batches, full forward with logits."""
    device = model.device
    grams, counts = {}, {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().float()
            x = x.view(-1, x.size(-1))
            xtx = x.T @ x
            if name not in grams:
                grams[name], counts[name] = (xtx / x.size(0)).cpu(), x.size(0)
            else:  # the seed kept the means on the host and moved them back every step
                grams[name] = ((grams[name].to(device) * counts[name] + xtx) / (counts[name] + x.size(0))).cpu()
                counts[name] += x.size(0)

        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for start in range(0, len(token_ids), batch_size):
                input_ids, mask = collate(token_ids, list(range(start, min(start + batch_size, len(token_ids)))))
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    return grams


def ours(model, token_ids, batch_size):
    grams, _, _ = accumulate_grams(model, token_ids, batch_size, progress=False)
    return {key: g.result() for key, g in grams.items()}


def variant(model, token_ids, batch_size, drop_padding, sort, shared, triangle, skip_logits):
    """A step between the seed's method and compute_gram's: float32 Gram sums (hooks on the
    linear inputs), with each of the project's changes on or off."""
    device = model.device
    head = model.get_output_embeddings()
    if shared:
        probe = torch.tensor([token_ids[0][:16]], device=device)
        leaders, _, head_name, _ = find_shared_inputs(model, probe)
    else:
        leaders = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        head_name = next(name for name, m in leaders.items() if m is head)
    grams = {name: Gram(m.in_features, device, blocks=None if triangle else 1) for name, m in leaders.items()}
    if sort:
        batches = length_batches([len(ids) for ids in token_ids], batch_size)
    else:
        batches = [list(range(s, min(s + batch_size, len(token_ids)))) for s in range(0, len(token_ids), batch_size)]
    rows = {}

    def hook(name):
        def fn(module, args):
            grams[name].add(args[0], rows["index"])

        return fn

    handles = [
        m.register_forward_pre_hook(hook(name))
        for name, m in leaders.items()
        if not (skip_logits and name == head_name)
    ]
    try:
        with torch.inference_mode():
            for batch in batches:
                input_ids, mask = collate(token_ids, batch)
                rows["index"] = mask.flatten().nonzero().squeeze(1).to(device) if drop_padding else None
                input_ids, mask = input_ids.to(device), mask.to(device)
                if skip_logits:
                    hidden = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                    grams[head_name].add(hidden, rows["index"])
                else:
                    model(input_ids=input_ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return {key: g.result() for key, g in grams.items()}


# The steps from the seed's method to compute_gram's, each adding one change to the one before.
STEPS = [
    ("+ float32 sum accumulator", dict(drop_padding=False, sort=False, shared=False, triangle=False)),
    ("+ padding rows dropped", dict(drop_padding=True, sort=False, shared=False, triangle=False)),
    ("+ length-sorted batches", dict(drop_padding=True, sort=True, shared=False, triangle=False)),
    ("+ shared inputs", dict(drop_padding=True, sort=True, shared=True, triangle=False)),
    ("+ upper triangle", dict(drop_padding=True, sort=True, shared=True, triangle=True)),
]


def matmul_peak(device, dtype, n):
    """Best rate of an n x n matmul (FLOP/s), this run, this device and dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def useful_flops(model, num_tokens):
    """Linear layers on the real tokens (lm_head's logits excluded, they are not needed)
    plus one full XᵀX per distinct linear input (lm_head's included)."""
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    cfg = model.config
    gram_dims = [cfg.hidden_size, cfg.hidden_size, cfg.hidden_size, cfg.intermediate_size] * cfg.num_hidden_layers + [
        cfg.hidden_size
    ]
    return 2 * num_tokens * (linear + sum(d * d for d in gram_dims))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, *args):
    sync(device)
    t = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - t


def build(args, device):
    """The seeded random model and token rows: the same in every process that builds them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.max_length, 512),
        tie_word_embeddings=False,
    )
    # built in float32 and cast, so that every dtype holds the same weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device, DTYPES[args.dtype]).eval()
    rng = random.Random(args.seed)
    token_ids = [
        [rng.randrange(args.vocab) for _ in range(rng.randint(args.min_length, args.max_length))]
        for _ in range(args.rows)
    ]
    if args.lengths == "full":
        token_ids = [[rng.randrange(args.vocab) for _ in range(args.max_length)] for _ in range(args.rows)]
    return model, token_ids


# ----------------------------------------------------------------------------- 1 vs N processes
def process_worker(rank, args, port, threads, reference, results):
    """One of --processes ranks: compute_gram.py's share + all-reduce, timed between barriers;
    rank 0 reports the time and the largest difference from the one-process grams."""
    import torch.distributed as dist

    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(threads)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.processes
    )
    try:
        model, token_ids = build(args, device)
        accumulate_grams(model, token_ids[: args.batch_size // 4 or 1], args.batch_size, progress=False)  # warm-up
        dist.barrier()
        t = time.perf_counter()
        grams, _, tokens = accumulate_grams(
            model, token_ids, args.batch_size, progress=False, rank=rank, num_processes=args.processes
        )
        all_reduce_grams(grams, tokens)
        sync(device)
        dist.barrier()
        elapsed = time.perf_counter() - t
        if rank == 0:
            from safetensors import safe_open

            with safe_open(reference, "pt") as f:
                error = max(
                    ((g.result().cpu() - f.get_tensor(k)).abs().max() / f.get_tensor(k).abs().max()).item()
                    for k, g in grams.items()
                )
            results.put((elapsed, error))
    finally:
        dist.destroy_process_group()


def compare_processes(args, device, model, token_ids):
    """compute_gram's pass in this process against the same pass split over --processes
    spawned ranks (gloo on cpu, one GPU each on cuda), the same rows, in one run. On cpu each
    rank gets threads // processes threads, so both use the same cores."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    from regmean.tensor_io import write_safetensors

    num_tokens = sum(map(len, token_ids))
    ours(model, token_ids[: args.batch_size // 4 or 1], args.batch_size)  # warm-up
    single, t_one = timed(ours, device, model, token_ids, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        reference = f"{tmp}/single.safetensors"
        write_safetensors(reference, single)
        del single
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        threads = max(1, torch.get_num_threads() // args.processes) if device.type == "cpu" else torch.get_num_threads()
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(process_worker, args=(args, port, threads, reference, results), nprocs=args.processes)
        t_many, error = results.get()
    print(f"{'1 process':>13}: {t_one:7.2f} s  {num_tokens / t_one:9.0f} tokens/s  ({torch.get_num_threads()} threads)")
    print(
        f"{f'{args.processes} processes':>13}: {t_many:7.2f} s  {num_tokens / t_many:9.0f} tokens/s  "
        f"({threads} threads each, all-reduce included)"
    )
    print(f"speed-up: {t_one / t_many:.2f}x; largest difference from one process: {error:.1e} (relative)")
    return t_one / t_many


def main(argv=None):
    args = parse_args(argv)
    device = choose_device(args.device)
    if args.dtype == "auto":
        dtype, why = auto_dtype(device, args.hidden)
        args.dtype = dtype_name(dtype)
        print(f"--dtype auto: {args.dtype} ({why})")
    dtype = DTYPES[args.dtype]
    model, token_ids = build(args, device)
    num_tokens = sum(map(len, token_ids))
    padded = sum(
        len(batch) * max(len(token_ids[i]) for i in batch)
        for batch in (range(s, min(s + args.batch_size, args.rows)) for s in range(0, args.rows, args.batch_size))
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {params / 1e6:.1f}M params (hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, {args.heads}:{args.kv_heads} heads, vocab {args.vocab}), {args.dtype} on {device}, "
        f"{torch.get_num_threads()} cpu threads"
    )
    print(
        f"rows: {args.rows}, lengths {args.lengths} ({min(map(len, token_ids))}-{max(map(len, token_ids))} tokens), "
        f"{num_tokens} tokens, batch {args.batch_size}; dataset-order batches are "
        f"{1 - num_tokens / padded:.0%} padding"
    )
    if args.processes > 1:
        return compare_processes(args, device, model, token_ids)

    # (label, function, model): the seed's method in --reference-dtype, then ours
    models = {args.dtype: model}
    for name in {args.reference_dtype or args.dtype, "float32" if args.against_float32 else args.dtype}:
        models.setdefault(name, build_cast(model, DTYPES[name]))
    ref_dtype = args.reference_dtype or args.dtype
    runs = [(f"seed method ({ref_dtype})", seed_method, models[ref_dtype])]
    if args.decompose:
        runs += [(label, partial(variant, skip_logits=False, **flags), model) for label, flags in STEPS]
    runs.append((f"compute_gram ({args.dtype})", ours, model))
    if args.against_float32 and args.dtype != "float32":
        runs.append(("compute_gram (float32)", ours, models["float32"]))

    warm = token_ids[: args.batch_size // 4 or 1]  # first-call allocations out of every timing
    for _, fn, m in runs:
        fn(m, warm, args.batch_size)
    times = {label: [] for label, _, _ in runs}
    for _ in range(args.repeat):  # alternating, so that a burst of load from other jobs hits all methods
        for label, fn, m in runs:
            times[label].append(timed(fn, device, m, token_ids, args.batch_size)[1])
            print(f"  {label}: {times[label][-1]:.2f} s", flush=True)
    peaks = {name: matmul_peak(device, DTYPES[name], 4096 if device.type == "cuda" else 2048) for name in models}
    peaks.setdefault("float32", matmul_peak(device, torch.float32, 4096 if device.type == "cuda" else 2048))
    peaks.setdefault("bfloat16", matmul_peak(device, torch.bfloat16, 4096 if device.type == "cuda" else 2048))
    work = useful_flops(model, num_tokens)

    print("matmul peak: " + ", ".join(f"{name} {p / 1e9:.0f} GFLOP/s" for name, p in sorted(peaks.items())))
    best = {label: min(t) for label, t in times.items()}
    t_seed = best[runs[0][0]]
    for label, _, m in runs:
        t, name = best[label], dtype_name(m.dtype)
        print(
            f"{label:>27}: {t:7.2f} s  {num_tokens / t:7.0f} tokens/s  {work / t / peaks[name]:6.1%} of the {name} "
            f"peak  {t_seed / t:5.2f}x the seed's  (runs: {', '.join(f'{x:.1f}' for x in times[label])} s)"
        )
    t_ours = best[f"compute_gram ({args.dtype})"]
    print(f"speed-up: {t_seed / t_ours:.2f}x")
    if args.against_float32 and args.dtype != "float32":
        print(f"compute_gram {args.dtype} against its float32 run: {best['compute_gram (float32)'] / t_ours:.2f}x")
    # On an 8B-shaped slice, the seed's job (10k rows through 32 layers) scales about with
    # layers x tokens; lm_head's share is counted 32/layers times, so this is an upper bound.
    mean_len = num_tokens / args.rows
    for name, t in ((runs[0][0], t_seed), ("compute_gram", t_ours)) if args.hidden == 4096 else ():
        hours = t / num_tokens * (32 / args.layers) * 10000 * mean_len / 3600
        print(f"extrapolated 10k rows of {mean_len:.0f} tokens, 32 layers, {name}: {hours:.2f} h")
    return t_seed / t_ours


def build_cast(model, dtype):
    """The same weights in another dtype (a copy; the model itself when the dtype is its own)."""
    import copy

    return model if model.dtype == dtype else copy.deepcopy(model).to(dtype)


if __name__ == "__main__":
    main()

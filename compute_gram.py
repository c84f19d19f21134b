r"""Stage 1: an expert and its calibration data -> gram.safetensors, the inner products
XᵀX / n of the input of every linear layer (lm_head included), over non-padding tokens.

    python compute_gram.py code        # rombos Replete-Coder on code_bagel_hermes-2.5
    python compute_gram.py math        # MAmmoTH2-8B on WebInstructSub
    python compute_gram.py toy-code    # the demo's toy expert (after `python demo.py --toy`)
    python compute_gram.py code --model DIR --dataset rows.jsonl --num-examples 500 \
        --output-dir runs/grams/mine --checkpoint-every 20
    python compute_gram.py --model DIR --dataset rows.jsonl --format code   # your own expert, no preset
    python compute_gram.py code --plan layers  # one decoder layer at a time (auto: when the model does not fit)
    accelerate launch --multi_gpu --num_processes 8 compute_gram.py code   # 8 GPUs, data parallel
    accelerate launch --multi_gpu --num_processes 2 compute_gram.py code --device-map auto  # 2 copies, half the GPUs
    accelerate launch --multi_gpu --num_processes 2 compute_gram.py toy-code --device cpu     # 2 cpu processes (gloo)

Each row is rendered with the model's chat template (code: instruction/input/output as
system/user/assistant; math: question/answer as user/assistant), truncated to
--max-length tokens; the first --num-examples rows are used, unshuffled. Examples are
batched by length so that little compute goes to padding, and the logits are never
computed: lm_head's gram only needs its input.

--plan model runs the whole expert with every accumulator on the device; --plan layers keeps the
tokens' hidden states (device, host or disk) and runs one decoder layer at a time read from the
safetensors files (regmean/layerwise.py): memory of one layer, whatever the depth. auto (the default) takes
the whole model when weights + grams + a batch fit the free memory, and logs which and why.

Linear layers that read the same tensor (q/k/v and gate/up in Llama, Mistral, Qwen2,
Gemma) share one gram; that is found by watching one forward pass, not from names. The
file stores one gram per distinct input under the first module's name, and maps the
others to it in the `aliases` metadata.

Several processes (`accelerate launch` or `torchrun`) split the work data parallel: the
length-sorted batches of a single run are dealt whole to the processes, balanced in padded
tokens; each accumulates its own sums on its own GPU (or cpu), the sums and token counts
are all-reduced (nccl on cuda, gloo on cpu), and the main process alone writes the file.
Any number of processes gives the single-process gram up to float rounding. With
--device-map each process spreads its copy of the expert over its share of the node's
GPUs (accelerate's big-model loading), and each layer's grams live on that layer's GPU.

With --checkpoint-every K the whole-model plan saves its partial sums every K batches to
OUTPUT_DIR/.gram-checkpoint[.rankR-of-N].safetensors, the layer plan each finished layer's grams;
the same command run again after an interruption continues from there (a checkpoint made with
other settings, data or number of processes is refused, saying so); they are deleted once
gram.safetensors is written. Grams are streamed to disk one tensor at a time.
"""

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from array import array
from datetime import timedelta
from pathlib import Path

import torch

from regmean.calibration import (
    BATCH_SIZE,
    MAX_LENGTH,
    NUM_EXAMPLES,
    SPLIT,
    Gram,
    bos_rule,
    calibration_tokens,
    check_one_row_per_token,
    collate,
    find_shared_inputs,
    length_batches,
    load_tokenizer,
    split_batches,
)
from regmean.layerwise import PARTS_DIR, DecoderAdapter, choose_plan, grams_by_layer
from regmean.tensor_io import (
    checkpoint_files,
    config_fingerprint,
    model_fingerprint,
    save_grams,
    tensor_infos,
    write_safetensors,
)
from regmean.utils import (
    CPU_BF16_MIN_SPEEDUP,
    FORMATS,
    GRAM_FILE,
    PRESETS,
    Progress,
    Timer,
    UserError,
    agree_on_dtype,
    check_at_least_one,
    choose_device,
    choose_dtype,
    describe_dtype,
    dtype_name,
    first_line,
    peak_memory,
    resolve_model_dir,
)
from utils import run_main

CHECKPOINT_FILE = ".gram-checkpoint.safetensors"
# How long processes wait for each other (torch's nccl default is 10 minutes): after a
# resume the shares left can differ by many batches, and the main process writes the file
# (32 GB for an 8B expert) while the others wait.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "preset",
        nargs="?",
        choices=sorted(PRESETS),
        help="expert + calibration data preset (optional when --model, --dataset and --format are all given)",
    )
    p.add_argument("--model", help="hub id or local folder (default: the preset's)")
    p.add_argument("--dataset", help="hub id or a .json/.jsonl/.parquet/.csv file (default: the preset's)")
    p.add_argument("--format", choices=sorted(FORMATS), help="row columns -> chat turns (default: the preset's)")
    p.add_argument("--split", default=SPLIT, help="dataset split (hub datasets) (default: %(default)s)")
    p.add_argument(
        "--num-examples", type=int, default=NUM_EXAMPLES, help="first N rows, unshuffled (default: %(default)s)"
    )
    p.add_argument(
        "--max-length", type=int, default=MAX_LENGTH, help="each example cut to this many tokens (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help="examples per forward pass (default: %(default)s)"
    )
    p.add_argument(
        "--output-dir", help="folder for gram.safetensors (default: the preset's, else runs/grams/MODEL_FOLDER_NAME)"
    )
    p.add_argument(
        "--plan",
        default="auto",
        choices=["auto", "model", "layers"],
        help="model: the whole expert on the device; layers: one decoder layer at a time on stored hidden states "
        "(memory of one layer, whatever the depth); auto: the whole model when its weights, grams and one "
        "batch fit the device's free memory, else layers (default: %(default)s)",
    )
    p.add_argument(
        "--max-hidden-gb",
        type=float,
        help="--plan layers: hidden states above this many GiB leave the device for host memory (cuda), "
        "else disk (default: half the free memory)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save partial sums every K batches; --plan layers: each finished layer (0: never) (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cuda, cuda:N or cpu (several processes on cuda: cuda:LOCAL_RANK each) (default: %(default)s)",
    )
    p.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="spread the expert over the visible GPUs (accelerate big-model loading; with several processes, "
        "each takes GPUs // processes-per-node of them); cuda only, ignored on cpu",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="dtype of the forward passes; the grams are float32 sums whatever it is (auto: bfloat16 on cuda, and on "
        "a cpu with native bfloat16 (avx512_bf16 or AMX) where a timed product at the model's width runs it at least "
        f"{CPU_BF16_MIN_SPEEDUP}x float32's speed; else float32) (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.preset is None:
        missing = [flag for flag in ("model", "dataset", "format") if getattr(args, flag) is None]
        if missing:
            raise UserError(
                f"give a preset ({', '.join(sorted(PRESETS))}) or your own expert with --model DIR --dataset FILE "
                f"--format {{{','.join(sorted(FORMATS))}}} (missing: {', '.join('--' + m for m in missing)})"
            )
    check_at_least_one(num_examples=args.num_examples, max_length=args.max_length, batch_size=args.batch_size)
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    return args


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(out_dir, rank=0, num_processes=1):
    """One checkpoint per process: each holds the partial sums of its own share."""
    if num_processes == 1:
        return Path(out_dir) / CHECKPOINT_FILE
    return Path(out_dir) / CHECKPOINT_FILE.replace(".safetensors", f".rank{rank}-of-{num_processes}.safetensors")


def check_no_foreign_checkpoints(out_dir, num_processes):
    """A checkpoint left by a run with another number of processes covers another split of
    the batches: refuse it rather than silently starting over."""
    ours = {checkpoint_path(out_dir, r, num_processes) for r in range(num_processes)}
    foreign = sorted(
        p.name for p in Path(out_dir).glob(CHECKPOINT_FILE.replace(".safetensors", "*.safetensors")) if p not in ours
    )
    if foreign:
        raise UserError(
            f"{out_dir} holds checkpoint(s) of a run with another number of processes ({', '.join(foreign)}); "
            f"rerun with that number to resume, or delete them to start over"
        )


def save_checkpoint(path, grams, batches_done, settings):
    """Partial sums + progress + the run's settings, written atomically, one tensor at a time."""
    meta = {
        "settings": json.dumps(settings, sort_keys=True),
        "batches_done": str(batches_done),
        "num_rows": json.dumps({k: g.num_rows for k, g in grams.items()}),
    }
    write_safetensors(path, {k: g.sum for k, g in grams.items()}, meta)


def load_checkpoint(path, grams, settings):
    """Fill `grams` from the checkpoint and return the number of batches it covers."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        saved = json.loads(meta["settings"])
        if saved != settings:
            diff = ", ".join(
                f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now"
                for k in settings
                if saved.get(k) != settings.get(k)
            )
            raise UserError(
                f"{path} was made with other settings ({diff}); "
                "rerun with those settings to resume, or delete it to start over"
            )
        num_rows = json.loads(meta["num_rows"])
        for key, gram in grams.items():
            gram.sum = f.get_tensor(key)  # its block rows (a full square from an older checkpoint is cut)
            gram.num_rows = num_rows[key]
    return int(meta["batches_done"])


def fingerprint(token_ids):
    """sha256 of the tokenized calibration set: a checkpoint only resumes on the same data."""
    h = hashlib.sha256()
    for ids in token_ids:
        h.update(array("q", ids).tobytes() + b"|")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the run
def module_device(module, default):
    """Where a module computes: its weight's device, or `default` for a weight offloaded by
    accelerate (kept on the meta device and brought in per forward)."""
    device = module.weight.device
    return default if device.type == "meta" else device


def compute_grams(
    model,
    token_ids,
    batch_size,
    checkpoint=None,
    checkpoint_every=0,
    settings=None,
    progress=True,
    rank=0,
    num_processes=1,
):
    """Accumulate the grams of every distinct linear-layer input of `model` over the
    examples `token_ids` (lists of ids), or over share `rank` of `num_processes` of their
    batches (see split_batches). Each gram lives on its module's device (a model spread
    over several GPUs keeps each layer's grams beside it). Returns ({stored key: Gram},
    aliases, number of tokens run in this call: fewer than its share when resuming)."""
    device = model.device
    probe = torch.tensor([token_ids[0][:16]], device=device)
    leaders, aliases, head_name, head_reads_base_output = find_shared_inputs(model, probe)
    grams = {name: Gram(m.in_features, module_device(m, device)) for name, m in leaders.items()}
    lengths = [len(ids) for ids in token_ids]
    batches = split_batches(length_batches(lengths, batch_size), lengths, num_processes)[rank]

    start = 0
    if checkpoint is not None and checkpoint.exists():
        start = load_checkpoint(checkpoint, grams, settings)
        who = f"rank {rank}: " if num_processes > 1 else ""
        print(f"{who}resuming from {checkpoint}: {start}/{len(batches)} batches done", file=sys.stderr)

    batch_rows = {}  # the batch being run: flat indices of its real tokens, read by the hooks

    def accumulate(name):
        def hook(module, args):
            check_one_row_per_token(name, args[0], batch_rows["total"])
            grams[name].add(args[0], batch_rows["index"])

        return hook

    skip_head = head_reads_base_output  # lm_head fed from the base model's output, no logits
    hooks = [
        m.register_forward_pre_hook(accumulate(name))
        for name, m in leaders.items()
        if not (skip_head and name == head_name)
    ]
    total_tokens = sum(lengths[i] for batch in batches for i in batch)
    done_tokens = sum(len(token_ids[i]) for batch in batches[:start] for i in batch)
    bar = Progress(
        total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="gram", disable=not progress
    )
    tokens_run = 0  # counted here: a disabled bar counts nothing
    try:
        with torch.inference_mode():
            for b in range(start, len(batches)):
                input_ids, mask = collate(token_ids, batches[b])
                batch_rows["index"] = mask.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
                batch_rows["total"] = mask.numel()
                input_ids, mask = input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                if skip_head:
                    hidden = model.base_model(
                        input_ids=input_ids, attention_mask=mask, use_cache=False
                    ).last_hidden_state
                    grams[head_name].add(hidden, batch_rows["index"])
                    del hidden
                else:
                    model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                tokens_run += len(batch_rows["index"])
                bar.update(len(batch_rows["index"]))
                if (
                    checkpoint is not None
                    and checkpoint_every
                    and (b + 1) % checkpoint_every == 0
                    and b + 1 < len(batches)
                ):
                    save_checkpoint(checkpoint, grams, b + 1, settings)
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    return grams, aliases, tokens_run


# ----------------------------------------------------------------------------- several processes
def all_reduce_grams(grams, tokens_run):
    """Sum the partial sums, row counts and tokens run of every process, in place, one gram
    at a time on the device it lives on. Returns the total tokens run (a no-op alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tokens_run
    for gram in Progress(grams.values(), desc="all-reduce", unit="gram", disable=dist.get_rank() != 0):
        dist.all_reduce(gram.sum)
    first = next(iter(grams.values())).sum.device  # nccl reduces cuda tensors, gloo cpu ones
    counts = torch.tensor([g.num_rows for g in grams.values()] + [tokens_run], dtype=torch.int64, device=first)
    dist.all_reduce(counts)
    for gram, n in zip(grams.values(), counts.tolist()):
        gram.num_rows = n
    return counts[-1].item()


def rank_placement(device, device_map, state):
    """This process's device and, with --device-map on several processes, its own slice of
    the node's GPUs as accelerate's max_memory (GPUs // processes per node each)."""
    if device.type != "cuda" or state.num_processes == 1:
        return device, None  # alone, --device-map may use every visible GPU
    if not device_map:
        return state.device, None  # cuda:LOCAL_RANK
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    per_rank = torch.cuda.device_count() // per_node
    if per_rank < 1:
        raise UserError(
            f"--device-map with {per_node} processes per node needs at least that many GPUs, "
            f"found {torch.cuda.device_count()}"
        )
    gpus = range(state.local_process_index * per_rank, (state.local_process_index + 1) * per_rank)
    torch.cuda.set_device(gpus[0])
    return torch.device("cuda", gpus[0]), {i: torch.cuda.mem_get_info(i)[0] for i in gpus}


# ----------------------------------------------------------------------------- ranks fail and end together
# Between two meeting points each rank works alone (loading, its share of the batches, the
# main process writing the file). A rank that failed there and just exited would leave the
# others blocked in their next collective until PROCESS_GROUP_TIMEOUT (2 h) under a launcher
# that does not kill them. So every rank stops at the same meeting points (meet()): each
# says whether it failed since the last one, and if one did, all stop with its message.
# The failing rank says so from ranks_in_step's exception handler, at the meeting point the
# others have reached; the others raise OtherRankFailed there and do not report it again, so
# every rank takes part in the same number of exchanges. At the end every rank destroys the
# process group (its worker threads drained and joined) while the interpreter is still whole:
# a group left to interpreter shutdown is torn down by destructors while gloo's threads may
# still hold work and tensors, and a rank once aborted that way ("terminate called without an
# active exception") after a run that had succeeded, and the launcher killed the others.
ERROR_BYTES = 1024  # room for one rank's message in the exchange


class OtherRankFailed(UserError):
    """Another process of the run failed; this one stops with its message."""


def in_process_group():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def exchange_errors(message: str | None) -> list[str | None]:
    """Every rank's message (None: no failure), gathered on every rank, fixed-size byte
    buffers in one all_gather (no pickling)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = (message or "").encode()[: ERROR_BYTES - 1]
    mine = torch.zeros(ERROR_BYTES, dtype=torch.uint8)
    mine[0] = message is not None
    mine[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    every = [torch.empty(ERROR_BYTES, dtype=torch.uint8, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine.to(device))
    every = [b.cpu() for b in every]
    return [bytes(b[1:].tolist()).rstrip(b"\0").decode(errors="replace") if b[0] else None for b in every]


def meet():
    """A meeting point of all ranks (a no-op alone): returns once every rank is here, or
    raises OtherRankFailed when one of them failed since the last meeting point."""
    if not in_process_group():
        return
    import torch.distributed as dist

    for rank, message in enumerate(exchange_errors(None)):
        if message is not None:
            raise OtherRankFailed(f"rank {rank} of {dist.get_world_size()} failed: {message}")


def ranks_in_step(main):
    """Wrap a stage's main() so that a failure on one rank reaches the others at their next
    meet(), and every rank destroys the process group before it returns or raises."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        import torch.distributed as dist

        healthy = True  # the group can still be used (and destroyed) by everyone
        try:
            return main(*args, **kwargs)
        except BaseException as e:
            if in_process_group() and not isinstance(e, OtherRankFailed):
                message = str(e) if isinstance(e, UserError) else first_line(e).removesuffix(": ")
                try:
                    exchange_errors(message)
                except Exception:  # the group itself broke (a rank died): our own error is the news
                    healthy = False
            raise
        finally:
            if healthy and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return run


def load_model(model_dir, device, dtype, device_map=None, max_memory=None):
    from transformers import AutoModelForCausalLM

    # flash-attention-2 where installed (cuda only), else PyTorch's sdpa
    attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    # --device-map: accelerate's big-model loading spreads the layers over the GPUs
    placement = (
        dict(device_map=device_map, max_memory=max_memory)
        if device_map and device.type == "cuda"
        else dict(device_map=str(device))
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn, **placement)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load a causal LM from {model_dir}: {first_line(e)}") from e
    return model.eval()


@ranks_in_step
def main(argv=None):
    from accelerate import PartialState

    args = parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    model_spec = args.model or preset["model"]
    dataset = args.dataset or preset["dataset"]
    fmt = args.format or preset["format"]
    out_dir = Path(args.output_dir or preset.get("gram_dir") or Path("runs/grams") / Path(model_spec).name)
    timer = Timer()
    device = choose_device(args.device)
    # Under `accelerate launch` (or torchrun) this joins the process group, gloo on cpu and
    # nccl on cuda; run alone it is one process and sets nothing up.
    state = PartialState(cpu=device.type == "cpu", timeout=PROCESS_GROUP_TIMEOUT)
    rank, num_processes = state.process_index, state.num_processes
    device, max_memory = rank_placement(device, args.device_map, state)

    # Everything that can be wrong with the input is checked before the model loads; every
    # process reads and tokenizes all rows (cheap), so all agree on the batches and refuse alike.
    model_dir = resolve_model_dir(model_spec)
    config = json.loads((model_dir / "config.json").read_text())
    dtype = choose_dtype(args.dtype, device, width=config.get("hidden_size"))  # auto on cpu: timed at that width
    tokenizer = load_tokenizer(model_dir)
    token_ids = calibration_tokens(tokenizer, dataset, fmt, args.split, args.num_examples, args.max_length)
    if out_dir.exists():
        check_no_foreign_checkpoints(out_dir, num_processes)
    files = checkpoint_files(model_dir)
    resume = None  # a run to resume keeps its plan
    if args.checkpoint_every and (out_dir / PARTS_DIR).exists():
        resume = "layers"
    resume = resume or ("model" if checkpoint_path(out_dir, rank, num_processes).exists() else None)
    batch, length = min(args.batch_size, len(token_ids)), max(map(len, token_ids))  # the largest batch
    meet()  # every rank checked its inputs (or one failed and all stop here) before the all-reduces below
    if args.dtype == "auto" and device.type == "cpu":
        dtype = agree_on_dtype(dtype)  # each rank timed its own products: float32 on all if one chose it
    plan, why = choose_plan(args.plan, model_dir, files, device, dtype, batch, length, args.device_map, resume)
    if state.is_main_process:
        where = f"{num_processes} processes" if num_processes > 1 else str(device)
        print(
            f"{model_spec}: {len(token_ids)} examples of {dataset}, {sum(map(len, token_ids))} tokens, "
            f"on {where} in {describe_dtype(args.dtype, dtype, device, config.get('hidden_size'))}",
            file=sys.stderr,
        )
        print(f"plan: {plan} ({why})", file=sys.stderr)

    provenance = dict(
        model=model_spec,
        dataset=dataset,
        split=args.split,
        num_examples=len(token_ids),
        max_length=args.max_length,
        row_format=fmt,  # not `format`: that metadata key holds the file's version
        dtype=dtype_name(dtype),
        # what binds the grams to this expert: merge_model.py checks them against each model it merges
        model_fingerprint=model_fingerprint(files),
        config_sha256=config_fingerprint(config),
        data_sha256=fingerprint(token_ids),
        bos=bos_rule(tokenizer),  # calibration.tokenize_texts: one BOS per row, whatever the template writes
    )
    # what must match for a checkpoint to resume (batch size and the number of processes fix
    # the batches each process runs; the data through data_sha256)
    settings = provenance | dict(batch_size=args.batch_size, num_processes=num_processes)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_path(out_dir, rank, num_processes)
    with timer("gram"):
        if plan == "model":
            model = load_model(model_dir, device, dtype, args.device_map, max_memory)
            grams, aliases, tokens_run = compute_grams(
                model,
                token_ids,
                args.batch_size,
                checkpoint,
                args.checkpoint_every,
                settings,
                progress=state.is_main_process,
                rank=rank,
                num_processes=num_processes,
            )
            del model
            meet()  # every share is done, or one rank failed and all stop here
            tokens_run = all_reduce_grams(grams, tokens_run)
            grams = {key: gram.packed() for key, gram in grams.items()}  # in place, each on its device
        else:
            lengths = [len(ids) for ids in token_ids]
            batches = split_batches(length_batches(lengths, args.batch_size), lengths, num_processes)[rank]
            adapter = DecoderAdapter(model_dir, tensor_infos(files), device, dtype, what="--plan layers")
            grams, aliases, tokens_run = grams_by_layer(
                adapter,
                files,
                token_ids,
                batches,
                out_dir,
                settings,
                lambda grams, tokens: meet() or all_reduce_grams(grams, tokens),  # a failed rank stops all here
                resume=args.checkpoint_every > 0,
                max_hidden_gb=args.max_hidden_gb,
                is_main=state.is_main_process,
                progress=state.is_main_process,
            )
            meet()
            tokens_run = sum(map(len, token_ids)) if tokens_run else 0  # every share ran through every layer
    num_tokens = sum(map(len, token_ids))
    path = out_dir / GRAM_FILE
    if state.is_main_process:  # the one writer; the gram is streamed to disk one tensor at a time
        save_grams(path, grams, aliases, num_tokens, provenance)
        for r in range(num_processes):
            checkpoint_path(out_dir, r, num_processes).unlink(missing_ok=True)
        shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
        print(f"wrote {path}: {len(grams)} grams ({len(aliases)} aliases), {num_tokens} tokens")
        seconds = timer.phases["gram"]
        print(
            f"wall {timer.total():.1f} s, {tokens_run} tokens in {seconds:.1f} s "
            f"({tokens_run / seconds:.0f} tokens/s) by the {plan} plan"
            f"{f' over {num_processes} processes' if num_processes > 1 else ''}, {peak_memory(device)}"
        )
    del grams
    meet()  # the others return once the file is in place (or stop if writing it failed)
    return path


if __name__ == "__main__":
    run_main(main)

"""Stage 1 as a library function: compute_grams(model, dataset, fmt, output_dir) writes an expert's
gram.safetensors and returns its path; compute_gram.py is its command line. Here too: the whole-model
plan (accumulate_grams, load_model) and its checkpoints; the layer plan is layerwise.py's, the run over
several processes ranks.py's. What it computes and why: docs/grams.md.
"""

import hashlib
import importlib.util
import json
import shutil
import sys
from array import array
from pathlib import Path

import torch
from torch import nn

from .calibration import (
    BATCH_SIZE,
    MAX_LENGTH,
    NUM_EXAMPLES,
    ROWS,
    SPLIT,
    Gram,
    RunningMeanGram,
    bos_rule,
    calibration_tokens,
    check_one_row_per_token,
    collate,
    file_order_batches,
    find_shared_inputs,
    length_batches,
    load_tokenizer,
    pad_batch,
    split_batches,
)
from .experts import Expert, load_expert
from .layerwise import PARTS_DIR, DecoderAdapter, choose_plan, grams_by_layer
from .ranks import PROCESS_GROUP_TIMEOUT, all_reduce_grams, meet, rank_placement, ranks_in_step
from .tensor_io import (
    GramFile,
    checkpoint_files,
    config_fingerprint,
    save_grams,
    tensor_infos,
    write_safetensors,
)
from .utils import (
    GRAM_FILE,
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
)

# The stage's settings beyond calibration.py's (SPLIT, NUM_EXAMPLES, MAX_LENGTH, BATCH_SIZE), declared once:
# compute_grams' defaults and compute_gram.py's.
PLANS = ("auto", "model", "layers")  # auto: the whole model when it fits the device, else one layer at a time
PLAN = "auto"
DEVICE = "auto"  # auto (cuda when there is one), cuda, cuda:N or cpu
DTYPE = "auto"  # dtype of the forward passes (the grams are float32 sums whatever it is); auto: utils.auto_dtype
CHECKPOINT_EVERY = 0  # partial sums saved every K batches (the layer plan: every finished layer); 0: never
ROW_RULE = "ours"  # calibration.ROWS: ours, or the reference's rows and running mean (docs/grams.md)

CHECKPOINT_FILE = ".gram-checkpoint.safetensors"
HOLDOUT = None  # --holdout F: every round(1/F)-th row goes to a second gram file (validation grams); None: no holdout
HOLDOUT_FILE = "gram-holdout.safetensors"  # the held-out rows' grams, beside gram.safetensors
HOLDOUT_WORK = ".holdout"  # the held-out pass's checkpoints and layer files, under the output folder


def holdout_rows(num_rows: int, fraction: float | None) -> tuple[list[int], list[int], str]:
    """The rows kept for the fit and the held-out ones: every k-th row, k = round(1 / fraction), from row
    k - 1 (deterministic, no shuffling); and the rule as the provenance records it. Refused in one line when
    the fraction is outside (0, 1) or leaves no fit row or no held-out row."""
    if fraction is None:
        return list(range(num_rows)), [], ""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--holdout must be in (0, 1), got {fraction}")
    k = max(2, round(1 / fraction))
    held = list(range(k - 1, num_rows, k))
    fit = [i for i in range(num_rows) if (i + 1) % k]
    if not held or not fit:
        raise UserError(f"--holdout {fraction} holds out every {k}th row of {num_rows}: no row is held out")
    rule = f"1 row in {k} held out (rows {k - 1}, {2 * k - 1}, ...; --holdout {fraction}): {len(held)} of {num_rows}"
    return fit, held, rule


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(out_dir: str | Path, rank: int = 0, num_processes: int = 1) -> Path:
    """One checkpoint per process: each holds the partial sums of its own share."""
    if num_processes == 1:
        return Path(out_dir) / CHECKPOINT_FILE
    return Path(out_dir) / CHECKPOINT_FILE.replace(".safetensors", f".rank{rank}-of-{num_processes}.safetensors")


def check_no_foreign_checkpoints(out_dir: str | Path, num_processes: int) -> None:
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


def save_checkpoint(path: Path, grams: dict[str, Gram], batches_done: int, settings: dict) -> None:
    """Partial sums + progress + the run's settings, written atomically, one tensor at a time."""
    meta = {
        "settings": json.dumps(settings, sort_keys=True),
        "batches_done": str(batches_done),
        "num_rows": json.dumps({k: g.num_rows for k, g in grams.items()}),
    }
    write_safetensors(path, {k: g.sum for k, g in grams.items()}, meta)


def load_checkpoint(path: Path, grams: dict[str, Gram], settings: dict) -> int:
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


def fingerprint(token_ids: list[list[int]]) -> str:
    """sha256 of the tokenized calibration set: a checkpoint only resumes on the same data."""
    h = hashlib.sha256()
    for ids in token_ids:
        h.update(array("q", ids).tobytes() + b"|")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the run
def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module computes: its weight's device, or `default` for a weight offloaded by
    accelerate (kept on the meta device and brought in per forward)."""
    device = module.weight.device
    return default if device.type == "meta" else device


def accumulate_grams(
    model: nn.Module,
    token_ids: list[list[int]],
    batch_size: int,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    settings: dict | None = None,
    progress: bool = True,
    rank: int = 0,
    num_processes: int = 1,
    padding: tuple[int, str] | None = None,
) -> tuple[dict[str, Gram], dict[str, str], int]:
    """Accumulate the grams of every distinct linear-layer input of `model` over the
    examples `token_ids` (lists of ids), or over share `rank` of `num_processes` of their
    batches (see split_batches). Each gram lives on its module's device (a model spread
    over several GPUs keeps each layer's grams beside it). Returns ({stored key: Gram},
    aliases, number of tokens run in this call: fewer than its share when resuming).
    padding: (pad id, side) for the reference's batches (--rows reference, one process): file order,
    padded on that side, every position counted in a running mean (calibration.RunningMeanGram)."""
    device = model.device
    probe = torch.tensor([token_ids[0][:16]], device=device)
    leaders, aliases, head_name, head_reads_base_output = find_shared_inputs(model, probe)
    kind = Gram if padding is None else RunningMeanGram
    grams = {name: kind(m.in_features, module_device(m, device)) for name, m in leaders.items()}
    lengths = [len(ids) for ids in token_ids]
    if padding is None:
        batches = split_batches(length_batches(lengths, batch_size), lengths, num_processes)[rank]
    else:
        batches = file_order_batches(len(token_ids), batch_size)

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

    def positions(batch):  # what the grams count: the real tokens, or every position of the padded batch
        return len(batch) * max(lengths[i] for i in batch) if padding else sum(lengths[i] for i in batch)

    total_tokens = sum(positions(batch) for batch in batches)
    done_tokens = sum(positions(batch) for batch in batches[:start])
    bar = Progress(
        total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="gram", disable=not progress
    )
    tokens_run = 0  # counted here: a disabled bar counts nothing
    try:
        with torch.inference_mode():
            for b in range(start, len(batches)):
                if padding is None:
                    input_ids, mask = collate(token_ids, batches[b])
                    batch_rows["index"] = mask.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
                else:  # the reference's: every position, padding included
                    input_ids, mask = pad_batch(token_ids, batches[b], *padding)
                    batch_rows["index"] = None
                batch_rows["total"] = mask.numel()
                counted = mask.numel() if padding else len(batch_rows["index"])
                input_ids, mask = input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                if skip_head:
                    hidden = model.base_model(
                        input_ids=input_ids, attention_mask=mask, use_cache=False
                    ).last_hidden_state
                    grams[head_name].add(hidden, batch_rows["index"])
                    del hidden
                else:
                    model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                tokens_run += counted
                bar.update(counted)
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


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | None = None,
    max_memory: dict[int, int] | None = None,
    adapter: Path | None = None,
) -> nn.Module:
    """The expert for the whole-model plan, in `dtype`, on `device` or spread by `device_map` (cuda); a LoRA
    expert as its base with the `adapter` folder folded in, in memory (peft's merge_and_unload): its linear
    layers, their names and their inputs are then the folded dense model's."""
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
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


# ----------------------------------------------------------------------------- the stage
REFERENCE_PLAN = "--rows reference needs --plan model: the layer plan leaves the padding out, the reference counted it"


def reference_padding(tokenizer, model: str) -> tuple[int, str]:
    """(pad id, side) of the reference's batches: its DataCollatorWithPadding padded with the tokenizer's pad token
    on the tokenizer's side (its `padding_side='left'` went to a call on one row, where there is nothing to pad)."""
    if tokenizer.pad_token_id is None:
        raise UserError(
            f"--rows reference pads with the tokenizer's pad token, and {model}'s tokenizer has none "
            "(the reference's DataCollatorWithPadding stops there too)"
        )
    return tokenizer.pad_token_id, tokenizer.padding_side


def whole_model_grams(
    model_dir: Path,
    token_ids: list[list[int]],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | None,
    max_memory: dict[int, int] | None,
    checkpoint: Path,
    checkpoint_every: int,
    settings: dict,
    state,
    padding: tuple[int, str] | None = None,
    adapter: Path | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """--plan model: this process's share through the whole expert (a LoRA: its base with `adapter` folded in),
    then every process's sums added up. Returns ({stored key: packed gram, each on its device}, aliases, tokens
    run by all processes)."""
    model = load_model(model_dir, device, dtype, device_map, max_memory, adapter)
    grams, aliases, tokens_run = accumulate_grams(
        model,
        token_ids,
        batch_size,
        checkpoint,
        checkpoint_every,
        settings,
        progress=state.is_main_process,
        rank=state.process_index,
        num_processes=state.num_processes,
        padding=padding,
    )
    del model
    meet()  # every share is done, or one rank failed and all stop here
    tokens_run = all_reduce_grams(grams, tokens_run)
    return {key: gram.packed() for key, gram in grams.items()}, aliases, tokens_run  # in place, each on its device


def layer_by_layer_grams(
    model_dir: Path,
    files: dict[str, Path],
    token_ids: list[list[int]],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    out_dir: Path,
    checkpoint_every: int,
    max_hidden_gb: float | None,
    settings: dict,
    state,
    expert=None,
) -> tuple[dict, dict[str, str], int]:
    """--plan layers: this process's share through one decoder layer at a time (layerwise.grams_by_layer),
    every process's sums added up after each layer (a LoRA `expert`: each layer's tensors folded as read).
    Returns (the grams, aliases, tokens run by all)."""
    lengths = [len(ids) for ids in token_ids]
    batches = split_batches(length_batches(lengths, batch_size), lengths, state.num_processes)[state.process_index]
    adapter = DecoderAdapter(model_dir, tensor_infos(files), device, dtype, what="--plan layers")
    grams, aliases, tokens_run = grams_by_layer(
        adapter,
        expert if expert is not None and expert.lora else files,
        token_ids,
        batches,
        out_dir,
        settings,
        lambda grams, tokens: meet() or all_reduce_grams(grams, tokens),  # a failed rank stops all here
        resume=checkpoint_every > 0,
        max_hidden_gb=max_hidden_gb,
        is_main=state.is_main_process,
        progress=state.is_main_process,
    )
    meet()
    return grams, aliases, sum(lengths) if tokens_run else 0  # every share ran through every layer


@ranks_in_step
def compute_grams(
    model: str | Path,
    dataset: str | Path,
    fmt: str,
    output_dir: str | Path,
    *,
    split: str = SPLIT,
    num_examples: int = NUM_EXAMPLES,
    max_length: int = MAX_LENGTH,
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    plan: str = PLAN,
    device_map: str | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    max_hidden_gb: float | None = None,
    rows: str = ROW_RULE,
    base: str | None = None,
    holdout: float | None = HOLDOUT,
) -> Path:
    """The grams of `model` (hub id or local folder) on the first `num_examples` rows of `dataset` (hub id
    or .json/.jsonl/.parquet/.csv file) in row format `fmt`, written to OUTPUT_DIR/gram.safetensors, whose
    path is returned. Under `accelerate launch` or `torchrun` each process runs its share and the main
    process writes the file; every process returns once it is there. A bad input raises UserError before
    the model loads. rows: "ours" (one BOS per row, padding left out) or "reference" (the reference's rows
    and running mean, to reproduce its grams: docs/grams.md). `model` may be a LoRA adapter folder (its base:
    `base`, else its config's) or BASE+ADAPTER: the grams are then those of the base with the adapter applied,
    on either plan. With `holdout`, every round(1/holdout)-th row goes to OUTPUT_DIR/gram-holdout.safetensors
    instead (its own token count and provenance), the validation grams of merge_model.py --alpha auto."""
    from accelerate import PartialState

    model, dataset, out_dir = str(model), str(dataset), Path(output_dir)
    check_at_least_one(num_examples=num_examples, max_length=max_length, batch_size=batch_size)
    if checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
    if plan not in PLANS:
        raise UserError(f"--plan must be one of {', '.join(PLANS)}, got {plan!r}")
    if rows not in ROWS:
        raise UserError(f"--rows must be one of {', '.join(ROWS)}, got {rows!r}")
    reference = rows == "reference"
    if reference and plan == "layers":
        raise UserError(REFERENCE_PLAN)
    if reference and holdout:
        raise UserError("--holdout is not the reference's: leave it out with --rows reference")
    device = choose_device(device)
    # Under `accelerate launch` (or torchrun) this joins the process group, gloo on cpu and
    # nccl on cuda; run alone it is one process and sets nothing up.
    state = PartialState(cpu=device.type == "cpu", timeout=PROCESS_GROUP_TIMEOUT)
    num_processes = state.num_processes
    if reference and num_processes > 1:
        raise UserError(
            "--rows reference runs in one process: the reference's running mean goes over its batches in file order"
        )
    device, max_memory = rank_placement(device, device_map, state)

    # Everything that can be wrong with the input is checked before the model loads; every
    # process reads and tokenizes all rows (cheap), so all agree on the batches and refuse alike.
    expert = load_expert(model, base)  # a LoRA adapter: its base, with the adapter folded in at load
    model_dir, adapter = expert.dir, expert.lora.dir if expert.lora else None
    config = json.loads((model_dir / "config.json").read_text())
    width = config.get("hidden_size")
    forward_dtype = choose_dtype(dtype, device, width=width)  # auto on cpu: timed at that width
    tokenizer = load_tokenizer(model_dir)
    token_ids = calibration_tokens(tokenizer, dataset, fmt, split, num_examples, max_length, rows)
    padding = reference_padding(tokenizer, model) if reference else None
    fit_rows, held_rows, rule = holdout_rows(len(token_ids), holdout)
    if out_dir.exists():
        check_no_foreign_checkpoints(out_dir, num_processes)
    meet()  # every rank checked its inputs (or one failed and all stop here) before the all-reduces below
    if dtype == "auto" and device.type == "cpu":
        forward_dtype = agree_on_dtype(forward_dtype)  # each rank timed its own: float32 on all if one chose it
    run = dict(
        model=model,
        dataset=dataset,
        model_dir=model_dir,
        config=config,
        fmt=fmt,
        split=split,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        forward_dtype=forward_dtype,
        plan=plan,
        device_map=device_map,
        max_memory=max_memory,
        checkpoint_every=checkpoint_every,
        max_hidden_gb=max_hidden_gb,
        state=state,
        tokenizer=tokenizer,
        expert=expert,
        adapter=adapter,
        reference=reference,
        padding=padding,
    )
    if held_rows:  # the held-out rows first, in their own work folder: each pass resumes from its own checkpoints
        held = [token_ids[i] for i in held_rows]
        work = out_dir / HOLDOUT_WORK
        if state.is_main_process:
            print(f"holdout: {rule}", file=sys.stderr)
        done = out_dir / HOLDOUT_FILE
        if not (done.exists() and GramFile(done).metadata.get("data_sha256") == fingerprint(held)):
            path = grams_of_rows(held, work, dict(holdout=f"held-out rows: {rule}"), **run)
            if state.is_main_process:
                path.replace(done)
                shutil.rmtree(work, ignore_errors=True)
            meet()
        token_ids = [token_ids[i] for i in fit_rows]
    return grams_of_rows(token_ids, out_dir, dict(holdout=f"fit rows: {rule}") if rule else {}, **run)


def grams_of_rows(
    token_ids: list[list[int]],
    out_dir: Path,
    extra: dict,
    *,
    model,
    dataset,
    model_dir,
    config,
    fmt,
    split,
    max_length,
    batch_size,
    device,
    dtype,
    forward_dtype,
    plan,
    device_map,
    max_memory,
    checkpoint_every,
    max_hidden_gb,
    state,
    tokenizer,
    expert: Expert,
    adapter: Path | None,
    reference: bool,
    padding: tuple[int, str] | None,
) -> Path:
    """compute_grams' run on the rows `token_ids` into OUT_DIR/gram.safetensors (extra: provenance to add)."""
    timer = Timer()
    rank, num_processes = state.process_index, state.num_processes
    width = config.get("hidden_size")
    files = checkpoint_files(model_dir)
    checkpoint = checkpoint_path(out_dir, rank, num_processes)
    resume = None  # a run to resume keeps its plan
    if checkpoint_every and (out_dir / PARTS_DIR).exists():
        resume = "layers"
    resume = resume or ("model" if checkpoint.exists() else None)
    batch, length = min(batch_size, len(token_ids)), max(map(len, token_ids))  # the largest batch
    if reference and resume == "layers":
        raise UserError(REFERENCE_PLAN)
    plan, why = choose_plan(plan, model_dir, files, device, forward_dtype, batch, length, device_map, resume)
    if reference and plan == "layers":
        raise UserError(f"{REFERENCE_PLAN}; the whole model does not fit here ({why})")
    num_tokens = sum(map(len, token_ids))
    if reference:  # the positions its grams count, padding included
        num_tokens = sum(
            len(b) * max(len(token_ids[i]) for i in b) for b in file_order_batches(len(token_ids), batch_size)
        )
    if state.is_main_process:
        where = f"{num_processes} processes" if num_processes > 1 else str(device)
        print(
            f"{model}: {len(token_ids)} examples of {dataset}, {num_tokens} tokens, "
            f"on {where} in {describe_dtype(dtype, forward_dtype, device, width)}",
            file=sys.stderr,
        )
        print(f"plan: {plan} ({why})", file=sys.stderr)

    provenance = dict(
        model=model,
        dataset=dataset,
        split=split,
        num_examples=len(token_ids),
        max_length=max_length,
        row_format=fmt,  # not `format`: that metadata key holds the file's version
        dtype=dtype_name(forward_dtype),
        # what binds the grams to this expert: merge_model.py checks them against each model it merges
        model_fingerprint=expert.fingerprint(),  # a LoRA's: its base's and its adapter's
        config_sha256=config_fingerprint(config),
        data_sha256=fingerprint(token_ids),
        bos=bos_rule(tokenizer),  # calibration.tokenize_texts: one BOS per row, whatever the template writes
        **extra,
    )
    if reference:  # the reference's rows: its tokenization, batches and padding decide the grams
        provenance.update(
            rows="reference",
            bos="as the reference: the template's text tokenized with the tokenizer's special tokens added",
            padding=f"batches of {batch_size} rows in file order, padded on the {padding[1]} with id {padding[0]}, "
            "every position counted, a float32 running mean",
        )
    # what must match for a checkpoint to resume (batch size and the number of processes fix
    # the batches each process runs; the data through data_sha256)
    settings = provenance | dict(batch_size=batch_size, num_processes=num_processes)
    out_dir.mkdir(parents=True, exist_ok=True)
    with timer("gram"):
        if plan == "model":
            grams, aliases, tokens_run = whole_model_grams(
                model_dir,
                token_ids,
                batch_size,
                device,
                forward_dtype,
                device_map=device_map,
                max_memory=max_memory,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
                settings=settings,
                state=state,
                padding=padding,
                adapter=adapter,
            )
        else:
            grams, aliases, tokens_run = layer_by_layer_grams(
                model_dir,
                files,
                token_ids,
                batch_size,
                device,
                forward_dtype,
                out_dir=out_dir,
                checkpoint_every=checkpoint_every,
                max_hidden_gb=max_hidden_gb,
                settings=settings,
                state=state,
                expert=expert,
            )
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

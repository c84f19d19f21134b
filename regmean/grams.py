"""Stage 1 as a library function: compute_grams(model, dataset, fmt, output_dir) writes an expert's
gram.safetensors and returns its path; compute_gram.py is its command line. Here: its checks, the rows
(ours or the reference's, held-out rows), the plan and the provenance; the whole-model plan is
model_plan.py's, the layer plan layerwise.py's, the run over several processes ranks.py's. What it computes
and why: docs/grams.md.
"""

import hashlib
import json
import shutil
import sys
from array import array
from pathlib import Path

import torch

from .calibration import (
    BATCH_SIZE,
    HELD,
    MAX_LENGTH,
    NUM_EXAMPLES,
    ROWS,
    SPLIT,
    bos_rule,
    calibration_tokens,
    file_order_batches,
    length_batches,
    load_tokenizer,
    split_batches,
)
from .experts import Expert, load_expert
from .layerwise import PARTS_DIR, DecoderAdapter, choose_plan, grams_by_layer
from .model_plan import check_no_foreign_checkpoints, checkpoint_path, whole_model_grams
from .ranks import PROCESS_GROUP_TIMEOUT, all_reduce_grams, meet, rank_placement, ranks_in_step
from .tensor_io import (
    checkpoint_files,
    config_fingerprint,
    save_grams,
    tensor_infos,
)
from .utils import (
    GRAM_FILE,
    Timer,
    UserError,
    agree_on_dtype,
    check_at_least_one,
    choose_device,
    choose_dtype,
    describe_dtype,
    dtype_name,
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

HOLDOUT = None  # --holdout F: every round(1/F)-th row goes to a second gram file (validation grams); None: no holdout
HOLDOUT_FILE = "gram-holdout.safetensors"  # the held-out rows' grams, beside gram.safetensors


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


def fingerprint(token_ids: list[list[int]]) -> str:
    """sha256 of the tokenized calibration set: a checkpoint only resumes on the same data."""
    h = hashlib.sha256()
    for ids in token_ids:
        h.update(array("q", ids).tobytes() + b"|")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the run


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
    held_out: frozenset[int] = frozenset(),
) -> tuple[dict, dict[str, str], int]:
    """--plan layers: this process's share through one decoder layer at a time (layerwise.grams_by_layer),
    every process's sums added up after each layer (a LoRA `expert`: each layer's tensors folded as read;
    held_out: rows whose grams are keyed HELD + key, from the same layer runs). Returns (the grams, aliases,
    tokens run by all)."""
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
        held_out=held_out,
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
    if held_rows and state.is_main_process:
        print(f"holdout: {rule}", file=sys.stderr)
    # with held-out rows, every pass (or layer run) feeds two accumulators per input
    return grams_of_rows(token_ids, out_dir, {}, holdout=(fit_rows, held_rows, rule) if held_rows else None, **run)


def pick_plan(
    token_ids, out_dir, plan, model_dir, device, forward_dtype, batch_size, device_map, checkpoint_every, reference,
    state, **_,
) -> tuple[str, str]:  # fmt: skip
    """The plan of a run on `token_ids` into `out_dir` and why: a run to resume keeps its plan, else choose_plan."""
    resume = None
    if checkpoint_every and (Path(out_dir) / PARTS_DIR).exists():
        resume = "layers"
    checkpoint = checkpoint_path(out_dir, state.process_index, state.num_processes)
    resume = resume or ("model" if checkpoint.exists() else None)
    batch, length = min(batch_size, len(token_ids)), max(map(len, token_ids))  # the largest batch
    if reference and resume == "layers":
        raise UserError(REFERENCE_PLAN)
    files = checkpoint_files(model_dir)
    plan, why = choose_plan(plan, model_dir, files, device, forward_dtype, batch, length, device_map, resume)
    if reference and plan == "layers":
        raise UserError(f"{REFERENCE_PLAN}; the whole model does not fit here ({why})")
    return plan, why


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
    holdout: tuple[list[int], list[int], str] | None = None,
) -> Path:
    """compute_grams' run on the rows `token_ids` into OUT_DIR/gram.safetensors (extra: provenance to add).
    holdout: (fit rows, held-out rows, rule): the held-out rows' grams go to OUT_DIR/gram-holdout.safetensors
    from the same forward passes (whole-model plan) or layer runs (layer plan)."""
    timer = Timer()
    rank, num_processes = state.process_index, state.num_processes
    width = config.get("hidden_size")
    files = checkpoint_files(model_dir)
    checkpoint = checkpoint_path(out_dir, rank, num_processes)
    plan, why = pick_plan(
        token_ids, out_dir, plan, model_dir, device, forward_dtype, batch_size, device_map, checkpoint_every, reference,
        state,
    )  # fmt: skip
    all_ids, held_ids = token_ids, []
    if holdout:
        fit_rows, held_rows, rule = holdout
        token_ids, held_ids = [all_ids[i] for i in fit_rows], [all_ids[i] for i in held_rows]
        extra = dict(extra, holdout=f"fit rows: {rule}")
    num_tokens = sum(map(len, token_ids))
    if reference:  # the positions its grams count, padding included
        num_tokens = sum(
            len(b) * max(len(token_ids[i]) for i in b) for b in file_order_batches(len(token_ids), batch_size)
        )
    if state.is_main_process:
        where = f"{num_processes} processes" if num_processes > 1 else str(device)
        held_out = f" (+ {len(held_ids)} held out, {sum(map(len, held_ids))} tokens, same passes)" if holdout else ""
        print(
            f"{model}: {len(token_ids)} examples of {dataset}, {num_tokens} tokens{held_out}, "
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
    if holdout:
        settings["held_out_sha256"] = fingerprint(held_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    with timer("gram"):
        if plan == "model":
            grams, aliases, tokens_run = whole_model_grams(
                model_dir,
                all_ids,
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
                held_out=frozenset(holdout[1]) if holdout else frozenset(),
            )
        else:
            grams, aliases, tokens_run = layer_by_layer_grams(
                model_dir,
                files,
                all_ids,
                batch_size,
                device,
                forward_dtype,
                out_dir=out_dir,
                checkpoint_every=checkpoint_every,
                max_hidden_gb=max_hidden_gb,
                settings=settings,
                state=state,
                expert=expert,
                held_out=frozenset(holdout[1]) if holdout else frozenset(),
            )
    path = out_dir / GRAM_FILE
    # the held-out grams apart (as lazily as the layer plan's finished grams, if that is what they are)
    held = type(grams)((k.removeprefix(HELD), grams.pop(k)) for k in list(grams) if k.startswith(HELD))
    if state.is_main_process and holdout:  # before gram.safetensors: a finished run has both
        held_provenance = dict(
            provenance,
            num_examples=len(held_ids),
            data_sha256=fingerprint(held_ids),
            holdout=f"held-out rows: {holdout[2]}",
        )
        save_grams(out_dir / HOLDOUT_FILE, held, aliases, sum(map(len, held_ids)), held_provenance)
        print(f"wrote {out_dir / HOLDOUT_FILE}: {len(held)} grams, {sum(map(len, held_ids))} tokens")
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
    del grams, held
    meet()  # the others return once the file is in place (or stop if writing it failed)
    return path

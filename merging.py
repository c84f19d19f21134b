"""The streaming merge that serves `avg`, `regmean` and RegMean++: experts' tensors are read from
their safetensors files when needed (in blocks of rows when large), merged (the weighted mean, or
RegMean's solve on the grams of a layer's input) and written straight to their place in the
output shards, so memory stays flat in depth and vocabulary. Linear weights in `averaged`
(--exclude) are the mean instead; where vocabularies nest (tokens added at the end), rows only some
experts have are the mean of those experts. The inputs are checked here too: experts against each
other, gram files against the experts they claim to describe (check_gram_models).

    experts = load_experts(["code", "math"])
    merge = StreamingMerge(experts, coefs, alpha, device, out_dtype, writer, timer, block_mb)
    report = merge_tensors(merge, gram_files, linear_modules(experts[0].infos, gram_files))
    judged = judge_tensors(merged_files, experts, coefs, gram_files, linear, device)   # any merged folder

Each linear layer's report row carries its output error figures (merge_report.py), taken on the
solver's own float32 rows and grams as the merge runs.
"""

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from merge_report import SAMPLE_EVERY, block_slice, layer_figures, sample_step
from regmean import RegMeanSystem, output_error_terms
from tensor_io import (
    ST_DTYPES,
    GramFile,
    ShardWriter,
    checkpoint_files,
    config_fingerprint,
    model_fingerprint,
    read_tensor,
    tensor_infos,
)
from utils import PRESETS, Progress, Timer, UserError, first_line, natural_key, resolve_model_dir

BLOCK_MB = 64  # large tensors are merged in blocks of rows of about this many MB per expert, as float32


# ----------------------------------------------------------------------------- the experts
@dataclass
class Expert:
    spec: str  # as given: a preset name, a folder or a hub id
    dir: Path
    config: dict  # config.json
    files: dict[str, Path]  # tensor name -> safetensors file
    infos: dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)

    @property
    def model_id(self) -> str:
        """What the model is called in the model card: the hub id of a preset, else as given."""
        return PRESETS[self.spec]["model"] if self.spec in PRESETS else self.spec


def expert_weights(specs: list[str], weights: list[float] | None) -> list[float]:
    """The experts' weights as given (default: equal), checked: two experts or more, one weight each,
    finite, >= 0 and not all 0."""
    if len(specs) < 2:
        raise UserError(f"--models needs at least 2 models, got {len(specs)}")
    weights = weights or [1.0] * len(specs)
    if len(weights) != len(specs):
        raise UserError(f"--weights has {len(weights)} values for {len(specs)} models")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights must be finite, >= 0 and not all 0, got {weights}")
    return weights


def preset_of(spec: str) -> str | None:
    """The preset a model is: by its name, or by its folder (runs/demo/smollm2-code is smollm2-code's)."""
    if spec in PRESETS:
        return spec
    here = Path(spec).resolve()
    return next((name for name, p in PRESETS.items() if Path(p["model"]).resolve() == here), None)


def resolve_gram_paths(specs: list[str], grams: list[str] | None) -> list[str]:
    """One gram file or folder per expert: as given, or the gram folder of each expert's preset."""
    if grams is None:
        presets = [preset_of(spec) for spec in specs]
        missing = [spec for spec, preset in zip(specs, presets) if preset is None]
        if missing:
            raise UserError(f"no default grams for {missing[0]!r} (not a preset): pass --grams, one per model")
        grams = [PRESETS[preset]["gram_dir"] for preset in presets]
    if len(grams) != len(specs):
        raise UserError(f"--grams has {len(grams)} files for {len(specs)} models")
    return [str(g) for g in grams]


def expert_labels(specs: list[str]) -> list[str]:
    """Short names of the experts for summaries and pictures: a preset's name, else the folder's."""
    return [spec if spec in PRESETS else Path(spec).name for spec in specs]


def load_experts(specs: list[str]) -> list[Expert]:
    """Each model's folder, config and tensor layout, checked to share one architecture and the
    same tensor names and shapes."""
    experts = []
    for spec in specs:
        model_dir = resolve_model_dir(spec)
        config_file = model_dir / "config.json"
        if not config_file.exists():
            raise UserError(f"{model_dir} has no config.json")
        files = checkpoint_files(model_dir)
        experts.append(Expert(spec, model_dir, json.loads(config_file.read_text()), files, tensor_infos(files)))
    first = experts[0]
    for e in experts[1:]:
        for key in ("model_type", "architectures"):
            if e.config.get(key) != first.config.get(key):
                raise UserError(
                    f"models differ in {key}: {first.dir} has {first.config.get(key)}, {e.dir} has {e.config.get(key)}"
                )
        names, other = set(first.infos), set(e.infos)
        if names != other:
            name = sorted(names ^ other)[0]
            raise UserError(
                f"tensor {name} is in {first.dir if name in names else e.dir} only; "
                "all models must have the same tensors"
            )
    differ = [n for n, (shape, _) in first.infos.items() if any(e.infos[n][0] != shape for e in experts[1:])]
    if differ:
        check_nested_vocabularies(experts, differ)
    return experts


def tied_head(expert: Expert) -> dict[str, str] | None:
    """{output head: input embedding} when the checkpoint ties them (the config says so and only the
    embedding is stored), else None. The shared matrix is merged as an embedding, by the weighted
    mean: it is also every token's input vector, which lm_head's gram says nothing about, and a
    solve on that gram alone would move the inputs of every layer above. The tie is kept in the
    output (one tensor, the experts' config)."""
    if not expert.config.get("tie_word_embeddings", False) or "lm_head.weight" in expert.infos:
        return None
    embeddings = [name for name in expert.infos if name.endswith("embed_tokens.weight")]
    return {"lm_head.weight": embeddings[0]} if embeddings else None


def shape_error(experts: list[Expert], name: str) -> UserError:
    first = experts[0]
    e = next(e for e in experts[1:] if e.infos[name][0] != first.infos[name][0])
    shapes = [list(x.infos[name][0]) for x in (first, e)]
    return UserError(f"tensor {name} has shape {shapes[0]} in {first.dir} but {shapes[1]} in {e.dir}")


def token_strings(model_dir: Path) -> list[str]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load a tokenizer from {model_dir}: {first_line(e)}") from e
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def check_nested_vocabularies(experts: list[Expert], differ: list[str]) -> None:
    """Tensors `differ` have other shapes in some experts. That is merged only when it is tokens
    added at the end of a vocabulary: each such tensor differs in its first dimension alone, which
    is its expert's vocab_size, and every expert's tokens are, string for string, the first
    tokens of the largest vocabulary. Anything else is the shape error it looks like."""
    for name in differ:
        shapes = [e.infos[name][0] for e in experts]
        if any(s[1:] != shapes[0][1:] or s[0] != e.config.get("vocab_size") for s, e in zip(shapes, experts)):
            raise shape_error(experts, name)
    largest = vocab_source(experts)
    tokens = token_strings(largest.dir)
    for e in experts:
        if e is largest:
            continue
        size = e.config["vocab_size"]
        mine = token_strings(e.dir)
        if len(mine) != size:
            raise UserError(
                f"{e.dir} has {size} vocabulary rows but {len(mine)} tokens: its rows cannot be matched to "
                f"{largest.dir}'s {largest.config['vocab_size']} (only vocabularies that nest are merged)"
            )
        bad = next((i for i in range(size) if i >= len(tokens) or mine[i] != tokens[i]), None)
        if bad is not None:
            theirs = tokens[bad] if bad < len(tokens) else "nothing"
            raise UserError(
                f"vocabularies do not nest: token {bad} is {mine[bad]!r} in {e.dir} but {theirs!r} in "
                f"{largest.dir}; tensor {differ[0]} differs in shape"
            )


def vocab_source(experts: list[Expert]) -> Expert:
    """Where the config and tokenizer of the merge come from: the last model listed, or, when
    vocabularies differ, the last of those with the largest one."""
    size = max(e.config.get("vocab_size") or 0 for e in experts)
    return [e for e in experts if (e.config.get("vocab_size") or 0) == size][-1]


def experts_dtype(experts: list[Expert]) -> torch.dtype:
    """The output dtype of `--dtype auto`: the experts' dtype (each expert's: that of most of its floating
    tensors); where experts differ, the widest of them, and float32 for bfloat16 with float16 (neither holds
    the other)."""
    dtypes = set()
    for e in experts:
        floating = [ST_DTYPES[d] for _, d in e.infos.values() if ST_DTYPES[d].is_floating_point]
        dtypes.add(max(set(floating), key=floating.count))
    widest = max(dtypes, key=lambda d: d.itemsize)
    if len(dtypes) > 1 and widest.itemsize <= 2:
        return torch.float32
    return widest


def merged_infos(experts: list[Expert]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} of the merge: the experts' own, but with the most
    rows where vocabularies differ."""
    return {
        name: (max((e.infos[name][0] for e in experts), key=lambda s: s[0] if s else 0), st_dtype)
        for name, (_, st_dtype) in experts[0].infos.items()
    }


def check_gram_models(experts: list[Expert], gram_files: list[GramFile], allow: bool = False) -> list[str]:
    """Each gram file must describe the expert at its position: its recorded model fingerprint (and
    config hash) must be the expert's. A mismatch is refused in one line naming both, and the expert
    the grams do match when there is one (the likely swap), unless `allow`. Returns lines for the
    log: notes on files that record no fingerprint (the reference release's gram.pkl), warnings
    on mismatches accepted."""
    notes, mine = [], {}

    def ours(j):  # computed once per expert, and only when some gram file has something to compare
        if j not in mine:
            mine[j] = (model_fingerprint(experts[j].files), config_fingerprint(experts[j].config))
        return mine[j]

    def matches(grams, j):
        fp, config = ours(j)
        recorded = grams.metadata.get("config_sha256")
        return grams.metadata["model_fingerprint"] == fp and recorded in (None, config)

    for i, (grams, e) in enumerate(zip(gram_files, experts)):
        if "model_fingerprint" not in grams.metadata:
            kind = "the reference release's format" if grams.metadata.get("format") == "seed-pickle" else "an old file"
            notes.append(f"note: {grams.path} ({kind}) records no model fingerprint: not checked against {e.dir}")
            continue
        if matches(grams, i):
            continue
        what = "weights" if grams.metadata["model_fingerprint"] != ours(i)[0] else "config"
        msg = (
            f"{grams.path} (grams of {grams.metadata.get('model', '?')}) does not match model {i + 1}, {e.dir}: "
            f"the {what} differ"
        )
        other = next((j for j in range(len(experts)) if j != i and matches(grams, j)), None)
        if other is not None:
            msg += f"; it matches model {other + 1}, {experts[other].dir}: are --grams in another order than --models?"
        if not allow:
            raise UserError(msg + " (--allow-gram-mismatch merges anyway)")
        notes.append(f"warning: {msg}; merging anyway (--allow-gram-mismatch)")
    return notes


def open_gram_files(experts: list[Expert], paths: list[str], allow: bool = False) -> list[GramFile]:
    """The experts' gram files, each checked to describe the expert at its position (check_gram_models:
    a swap is refused and named unless `allow`), its notes on stderr. merge_model.py and judge_merge.py
    both open their grams here, so that both refuse the same mistakes."""
    gram_files = [GramFile(p) for p in paths]
    for line in check_gram_models(experts, gram_files, allow):
        print(line, file=sys.stderr)
    return gram_files


def linear_weight_names(config_dir: Path, infos: dict) -> list[str]:
    """The modules of the architecture that are nn.Linear and whose weight the checkpoint holds
    (a tied lm_head has none), read off a meta-device skeleton."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    return [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" in infos]


def match_exclusions(patterns: list[str], modules: list[str]) -> list[str]:
    """The modules whose name any of the regular expressions finds (re.search). A pattern that is
    not a regular expression, or matches no linear layer, is an error, not a silent no-op."""
    found = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise UserError(f"--exclude {pattern!r} is not a regular expression: {e}") from e
        hits = {m for m in modules if regex.search(m)}
        if not hits:
            raise UserError(f"--exclude {pattern!r} matches no linear layer (e.g. {modules[0]}, {modules[-1]})")
        found |= hits
    return sorted(found, key=natural_key)  # layers.2 before layers.10


def linear_modules(infos: dict, gram_files: list[GramFile]) -> dict[str, int]:
    """{module: in features} of the linear layers RegMean merges: the 2-D `.weight` tensors whose
    module has a gram. Every gram file must hold an [in, in] gram for each of them (the shapes are
    checked here from the headers; each gram's values are checked finite by GramFile.get as the
    merge reads it for its solve, so that a merge reads every gram once)."""
    linear = {}
    for name, (shape, _) in infos.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and len(shape) == 2 and any(module in g for g in gram_files):
            linear[module] = shape[1]
    if not linear:
        raise UserError(f"no gram in {[str(g.path) for g in gram_files]} matches a weight of the models (wrong grams?)")
    for grams in gram_files:
        for module, n in linear.items():
            if module not in grams:
                raise UserError(f"{grams.path} has no gram for {module} (other gram files have one)")
            if grams.shape(module) != (n, n):
                raise UserError(
                    f"{grams.path}: gram of {module} has shape {list(grams.shape(module))}, expected [{n}, {n}]"
                )
    return linear


# ----------------------------------------------------------------------------- the merge
def row_blocks(shape: tuple[int, ...], block_mb: float) -> list[tuple[int, int] | None]:
    """(start, stop) row ranges of a tensor, each about block_mb MB in float32."""
    if len(shape) == 0:
        return [None]
    row_bytes = max(1, math.prod(shape[1:]) * 4)
    step = max(1, int(block_mb * 2**20 // row_bytes))
    return [(i, min(i + step, shape[0])) for i in range(0, max(shape[0], 1), step)]


def writer_dtype(out_dtype: torch.dtype, st_dtype: str) -> torch.dtype:
    """Floating tensors are written in the output dtype; integer buffers keep their own."""
    return out_dtype if ST_DTYPES[st_dtype].is_floating_point else ST_DTYPES[st_dtype]


def gram_stats(gram: Tensor, tokens: int | None) -> dict:
    """Figures of one expert's gram for the report: its tokens, trace, mean diagonal and
    max/min diagonal (a lower bound of the condition number, free to compute)."""
    d = gram.diagonal().double()
    return dict(
        tokens=tokens,
        trace=d.sum().item(),
        mean_diag=d.mean().item(),
        cond_lower_bound=(d.max() / d.min()).item() if d.min() > 0 else float("inf"),
    )


def pick_rows(blocks: list[Tensor], merged: Tensor, rows: tuple[int, int], step: int) -> list[Tensor]:
    """Copies of the sampled rows (merge_report.sample_rows) in one block of rows (start, stop): each
    expert's, then the merged weight's as written."""
    picked = block_slice(rows, step)
    return [b[picked].clone() for b in [*blocks, merged]]


def group_error_figures(
    grams: list[Tensor], picks: dict[str, list[list[Tensor]]], num_rows: dict[str, int], coefs: list[float]
) -> dict[str, dict]:
    """The output error figures of the weights that read one input, from the rows pick_rows took
    ({weight: one pick per block}) and the experts' full grams (float32, on the rows' device): one
    product per expert for all of them. The average is rounded to the merged weight's dtype, as an
    `avg` merge would write it. Returns {weight: merge_report.layer_figures}."""
    names = list(picks)
    columns = [torch.cat([pick[j] for name in names for pick in picks[name]]) for j in range(len(coefs) + 1)]
    experts, merged = [c.float() for c in columns[:-1]], columns[-1]
    average = sum(c * w for c, w in zip(coefs, experts)).to(merged.dtype)
    terms = output_error_terms(merged, average, experts, grams)
    sizes = [sum(len(pick[0]) for pick in picks[name]) for name in names]
    return {name: layer_figures(t, num_rows[name]) for name, t in zip(names, terms.split(sizes, -1))}


@dataclass
class StreamingMerge:
    """What every merged tensor needs: the experts and their normalized weights, alpha, where the
    solves run, the output dtype, the shard writer, the phase timer, the row block size, the linear
    weights excluded from RegMean and the output error figures' row sampling (0: no figures)."""

    experts: list[Expert]
    coefs: list[float]
    alpha: float
    device: torch.device
    out_dtype: torch.dtype
    writer: ShardWriter
    timer: Timer
    block_mb: float = BLOCK_MB
    averaged: frozenset[str] = frozenset()  # linear weights excluded from RegMean (--exclude): the mean
    sample_every: int = SAMPLE_EVERY

    def __post_init__(self):
        self.infos = merged_infos(self.experts)

    def blocks(self, name: str) -> list[tuple[tuple[int, int] | None, list[int]]]:
        """(rows, the experts that have them) per block of rows of tensor `name`. All experts have
        all rows, except where vocabularies differ: rows past an expert's vocabulary are not its."""
        shape = self.infos[name][0]
        if not shape:
            return [(None, list(range(len(self.experts))))]
        out, start = [], 0
        for end in sorted({e.infos[name][0][0] for e in self.experts}):
            have = [i for i, e in enumerate(self.experts) if e.infos[name][0][0] >= end]
            out += [((start + a, start + b), have) for a, b in row_blocks((end - start, *shape[1:]), self.block_mb)]
            start = end
        return out

    def mean_block(self, name: str, rows: tuple[int, int] | None, have: list[int]) -> Tensor:
        """The weighted mean of rows `rows` of tensor `name` over the experts `have` (their weights
        renormalized), in the written dtype."""
        with self.timer("load"):
            blocks = [read_tensor(self.experts[i].files[name], name, rows) for i in have]
        with self.timer("solve"):
            if not blocks[0].is_floating_point():  # integer buffers are not averaged: the last model's value
                return blocks[-1]
            coefs = [self.coefs[i] for i in have]
            coefs = coefs if len(have) == len(self.experts) else [c / sum(coefs) for c in coefs]
            merged = sum(c * b.to(self.device, torch.float32) for c, b in zip(coefs, blocks))
            return merged.to(writer_dtype(self.out_dtype, self.infos[name][1]))

    def mean(self, name: str, keep: bool = False) -> Tensor | None:
        """The weighted mean of tensor `name` into the shards, block by block; with keep, also
        returned as written (for a forward pass through the merged model)."""
        kept = []
        for rows, have in self.blocks(name):
            merged = self.mean_block(name, rows, have)
            with self.timer("write"):
                self.writer.write(name, merged, rows[0] if rows else 0)
            if keep:
                kept.append(merged)
        if keep:
            return kept[0] if len(kept) == 1 else torch.cat(kept)
        return None

    def linear_group(
        self, members: list[str], grams: list[Tensor], tokens: list[int | None], keep: bool = False
    ) -> tuple[list[dict], dict[str, Tensor]]:
        """RegMean merge of the linear weights `members` that read one input (q/k/v, gate/up, or one
        layer alone) on one factorization of their system. grams: each expert's gram of that input;
        tokens: how many tokens each gram saw (None where unknown). Returns one report row per
        weight and, with keep, {name: merged weight as written}."""
        infos, kept = self.infos, {}
        for member in [m for m in members if m in self.averaged]:
            merged = self.mean(member, keep)
            if keep:
                kept[member] = merged
        members = [m for m in members if m not in self.averaged]
        if not members:
            return [], kept
        t0 = time.perf_counter()
        stats = [gram_stats(g, n) for g, n in zip(grams, tokens)]
        with self.timer("solve"):
            system = RegMeanSystem.factor(
                grams, self.alpha, self.coefs, self.device, num_rows=sum(infos[m][0][0] for m in members)
            )
        factor_s = time.perf_counter() - t0
        report, picks = [], {}
        for member in members:
            t0 = time.perf_counter()
            worst_residual, worst_error, blocks_out = 0.0, 0.0, []
            step = sample_step(infos[member][0][0], self.sample_every) if self.sample_every else None
            for rows, have in self.blocks(member):
                if len(have) < len(self.experts):  # tokens only some experts have: their rows' mean
                    merged = self.mean_block(member, rows, have)
                else:
                    with self.timer("load"):
                        blocks = [
                            read_tensor(e.files[member], member, rows).to(self.device, torch.float32)
                            for e in self.experts
                        ]
                    with self.timer("solve"):
                        merged, residual, error = system.solve(blocks)
                        merged = merged.to(self.out_dtype)
                    worst_residual, worst_error = max(worst_residual, residual), max(worst_error, error)
                    if step is not None:  # rows every expert has: the output error figures' sample
                        with self.timer("figures"):
                            picks.setdefault(member, []).append(pick_rows(blocks, merged, rows, step))
                with self.timer("write"):
                    self.writer.write(member, merged, rows[0])
                if keep:
                    blocks_out.append(merged)
            if keep:
                kept[member] = torch.cat(blocks_out)
            report.append(
                dict(
                    tensor=member,
                    n=system.n,
                    path=system.path,
                    ridge=system.ridge,
                    probe_error=system.probe_error,
                    cutoff=system.cutoff,
                    unexcited=system.unexcited,
                    residual=worst_residual,
                    error_estimate=worst_error,
                    seconds=round(time.perf_counter() - t0 + factor_s, 4),
                    grams=stats,
                )
            )
            factor_s = 0.0  # the factorization is counted once, with the first layer of its group
        if picks:
            with self.timer("figures"):
                figures = group_error_figures(system.grams, picks, {m: infos[m][0][0] for m in picks}, self.coefs)
            for row in report:
                row["output_error"] = figures[row["tensor"]]
        return report, kept


def gram_groups(gram_files: list[GramFile], linear: dict[str, int]) -> dict[tuple[str, ...], list[str]]:
    """{gram keys (one per expert): the weight names that read that input}, in checkpoint order."""
    groups = {}
    for module in linear:
        key = tuple(g.key_of[module] for g in gram_files)
        groups.setdefault(key, []).append(module + ".weight")
    return groups


def merge_tensors(
    merge: StreamingMerge, gram_files: list[GramFile], linear: dict[str, int], desc: str = "merge"
) -> list[dict]:
    """Merge every tensor into the shards, one tensor (or block of rows) at a time: the linear
    layers in `linear` by RegMean on the grams of `gram_files` (those that share an input
    together, on one factorization), every other tensor by the weighted mean. Returns per-layer
    diagnostics."""
    infos = merge.infos
    linear = {m: n for m, n in linear.items() if m + ".weight" not in merge.averaged}  # excluded: the mean
    groups = gram_groups(gram_files, linear)
    group_of = {name: key for key, names in groups.items() for name in names}
    tokens = [int(g.metadata["num_tokens"]) if "num_tokens" in g.metadata else None for g in gram_files]
    done, report = set(), []
    bar = Progress(total=len(infos), desc=desc, unit="tensor")
    for name in infos:
        if name in done:
            continue
        if name not in group_of:
            merge.mean(name)
            done.add(name)
            bar.update(1)
            continue
        key = group_of[name]
        with merge.timer("load"):
            grams = [g.get(k) for g, k in zip(gram_files, key)]
        rows, _ = merge.linear_group(groups[key], grams, tokens)
        del grams
        report += [dict(r, gram=key[0]) for r in rows]
        done.update(groups[key])
        bar.update(len(groups[key]))
    bar.close()
    return report


def summarize(report: list[dict]) -> str:
    """One line on the solves of a merge: layers, paths taken, directions left at the average, worst
    residual and error."""
    if not report:
        return ""
    paths = {}
    for r in report:
        paths[r["path"]] = paths.get(r["path"], 0) + 1
    short = [r for r in report if r.get("unexcited")]
    return (
        f"{len(report)} linear layers; paths "
        + ", ".join(f"{k} {v}" for k, v in sorted(paths.items()))
        + f"; {sum(r['unexcited'] for r in short)} input directions left at the average in {len(short)} layers"
        + f"; max relative residual {max(r['residual'] for r in report):.2e}"
        + f"; max estimated relative error {max(r['error_estimate'] for r in report):.2e}"
    )


def unexcited_lines(report: list[dict]) -> list[str]:
    """One log line per linear layer with input directions the calibration data never excited (its
    system's eigenvalues below the float32 cutoff): how many, of how many, were left at the average."""
    return [
        f"{r['tensor']}: {r['unexcited']} of {r['n']} input directions unexcited (eigenvalue below "
        f"{r['cutoff']:.2e}), left at the average"
        for r in report
        if r.get("unexcited")
    ]


def judge_tensors(
    merged_files: dict[str, Path],
    experts: list[Expert],
    coefs: list[float],
    gram_files: list[GramFile],
    linear: dict[str, int],
    device: torch.device,
    sample_every: int = SAMPLE_EVERY,
    block_mb: float = BLOCK_MB,
) -> list[dict]:
    """The output error figures of an existing merged model (merged_files: tensor name -> its
    safetensors file) against the experts, for every linear layer in `linear`, on the same sampled
    rows as a merge takes them. Returns one report row per weight: tensor, gram, output_error."""
    infos, report = experts[0].infos, []
    groups = gram_groups(gram_files, linear)
    bar = Progress(total=sum(len(v) for v in groups.values()), desc="judging", unit="layer")
    for key, members in groups.items():
        grams = [g.get(k).to(device, torch.float32) for g, k in zip(gram_files, key)]
        picks = {}
        for member in members:
            step = sample_step(infos[member][0][0], sample_every)
            for rows in row_blocks(infos[member][0], block_mb):
                if block_slice(rows, step).start >= rows[1] - rows[0]:
                    continue  # no sampled row in this block
                blocks = [read_tensor(e.files[member], member, rows).to(device) for e in experts]
                merged = read_tensor(merged_files[member], member, rows).to(device)
                picks.setdefault(member, []).append(pick_rows(blocks, merged, rows, step))
            bar.update(1)
        figures = group_error_figures(grams, picks, {m: infos[m][0][0] for m in members}, coefs)
        report += [dict(tensor=m, gram=key[0], output_error=figures[m]) for m in members]
        del grams
    bar.close()
    return report

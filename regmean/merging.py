"""The streaming merge that serves `avg`, `regmean` and RegMean++: experts' tensors are read from
their safetensors files when needed (in blocks of rows when large), merged (the weighted mean, or
RegMean's solve on the grams of a layer's input) and written straight to their place in the
output shards, so memory stays flat in depth and vocabulary. Linear weights in `averaged`
(--exclude) are the mean instead; where vocabularies nest (tokens added at the end), rows only some
experts have are the mean of those experts. The experts and their gram files are checked
before (regmean/experts.py).

    experts = load_experts(["code", "math"])
    merge = StreamingMerge(experts, coefs, alpha, device, out_dtype, writer, timer, block_mb)
    report = merge_tensors(merge, gram_files, linear_modules(experts[0].infos, gram_files))
    judged = judge_tensors(load_expert(folder), experts, coefs, gram_files, linear, device)   # any merged folder

Each linear layer's report row carries its output error figures (regmean/merge_report.py), taken on the
solver's own float32 rows and grams as the merge runs.
"""

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .experts import (
    Expert,
    merged_infos,
)
from .merge_report import SAMPLE_EVERY, block_slice, layer_figures, sample_step
from .solver import ReferenceSystem, RegMeanSystem, add_deviation, deviation_sums, output_error_terms, wide_rhs
from .tensor_io import (
    ST_DTYPES,
    GramFile,
    ShardWriter,
)
from .utils import Progress, Timer

BLOCK_MB = 64  # large tensors are merged in blocks of rows of about this many MB per expert, as float32
# the rows solved per pass over the experts: up to this many grams' worth (or a block); more read the grams again
CHUNK_GRAMS = 4


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
    grams: Callable[[int], Tensor], picks: dict[str, list[list[Tensor]]], num_rows: dict[str, int], coefs: list[float]
) -> dict[str, dict]:
    """The output error figures of the weights that read one input, from the rows pick_rows took
    ({weight: one pick per block: each expert's rows, then the merged ones}) and the experts' full grams
    (grams(i): float32, read one at a time): one product per expert for all of them. The average is
    rounded to the merged weight's dtype, as an `avg` merge would write it. Returns {weight:
    merge_report.layer_figures}."""
    names = list(picks)
    columns = [torch.cat([pick[j] for name in names for pick in picks[name]]) for j in range(len(coefs) + 1)]
    experts, merged = [c.float() for c in columns[:-1]], columns[-1]
    average = sum(c * w for c, w in zip(coefs, experts)).to(merged.dtype)
    terms = []
    for i, w in enumerate(experts):
        gram = grams(i).to(w.device, torch.float32)
        terms.append(output_error_terms(merged, average, [w], [gram]))
        del gram
    terms = torch.cat(terms, 1)
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
    solve: str = "ours"  # ours: RegMeanSystem; reference: the reference's lstsq (ReferenceSystem)
    alphas: dict[str, float] | None = None  # α per input (gram key of the first expert), where not one for all

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
            blocks = [self.experts[i].read(name, rows) for i in have]
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
        self,
        members: list[str],
        grams: Callable[[int], Tensor],
        tokens: list[int | None],
        keep: bool = False,
        family: list | None = None,
        alpha: float | None = None,
    ) -> tuple[list[dict], dict[str, Tensor]]:
        """RegMean merge of the linear weights `members` that read one input (q/k/v, gate/up, or one
        layer alone) on one factorization of their system, one expert's gram at a time: grams(i) gives
        expert i's gram of that input (float32 [in, in]) and is called once per pass over the experts
        (docs/merging.md#memory). tokens: how many tokens each gram saw (None where unknown); family: the
        (digests, α, system) of groups merged before whose grams may be identical copies (merge_tensors),
        to which this group's is added; alpha: this input's α (default: the merge's). Returns one report
        row per weight and, with keep, {name: merged weight as written}."""
        kept = {}
        alpha = self.alpha if alpha is None else alpha
        for member in [m for m in members if m in self.averaged]:
            merged = self.mean(member, keep)
            if keep:
                kept[member] = merged
        members = [m for m in members if m not in self.averaged]
        if not members:
            return [], kept
        if self.solve == "reference":  # the reference's arithmetic: its N grams at once, as it held them
            return self.held_group(members, [grams(i) for i in range(len(self.experts))], tokens, keep, family, alpha)
        t0, n, num = time.perf_counter(), self.infos[members[0]][0][1], len(self.experts)
        blocks, out = [], {}  # blocks of rows every expert has: solved; out (keep): (member, start) -> merged block
        for member in members:
            for rows, have in self.blocks(member):
                if len(have) < num:  # tokens only some experts have: their rows' mean
                    merged = self.mean_block(member, rows, have)
                    with self.timer("write"):
                        self.writer.write(member, merged, rows[0])
                    if keep:
                        out[member, rows[0]] = merged
                else:
                    blocks.append((member, rows))
        steps = {m: sample_step(self.infos[m][0][0], self.sample_every) for m in members} if self.sample_every else {}
        first, picks = dict(stats=[], digests=[] if family is not None else None, tokens=tokens), {}
        system, wide = RegMeanSystem.start(n, alpha, self.coefs, self.device), wide_rhs(n, alpha)
        worst, reused = dict.fromkeys(members, (0.0, 0.0)), False
        for c, chunk in enumerate(chunk_blocks(blocks, max(int(self.block_mb * 2**20 // (4 * n)), CHUNK_GRAMS * n))):
            sums = self.chunk_pass(
                chunk, grams, n, alpha, wide, *((system, first) if c == 0 else (None, None)), picks, steps
            )
            with self.timer("solve"):
                if c == 0:
                    same = next((s for d, a, s in family or [] if a == alpha and d == first["digests"]), None)
                    reused = same is not None
                    if reused:
                        system = same
                    else:
                        system.finish()
                        if family is not None:
                            family.append((first["digests"], alpha, system))
                solved = system.solve_deviation(*sums)
            if solved is None:  # the path moved to float64 (a fallback): the sums again, in float64
                wide, sums = True, None
                sums = self.chunk_pass(chunk, grams, n, alpha, True)
                with self.timer("solve"):
                    solved = system.solve_deviation(*sums)
            del sums
            merged, residual, error = solved
            merged, start = merged.to(self.out_dtype), 0
            for member, rows in chunk:
                block = merged[start : start + rows[1] - rows[0]]
                if keep:
                    out[member, rows[0]] = block
                start += rows[1] - rows[0]
                worst[member] = (max(worst[member][0], residual), max(worst[member][1], error))
                with self.timer("write"):
                    self.writer.write(member, block, rows[0])
                if (member, rows[0]) in picks:
                    picks[member, rows[0]].append(block[block_slice(rows, steps[member])].clone())
            del merged
        report, seconds = [], time.perf_counter() - t0
        total_rows = sum(self.infos[m][0][0] for m in members)
        for member in members:
            if keep:
                kept[member] = torch.cat([b for (m, _), b in sorted(out.items(), key=lambda x: x[0][1]) if m == member])
            report.append(
                dict(
                    tensor=member,
                    alpha=alpha,
                    n=system.n,
                    **system.diagnostics(),
                    residual=worst[member][0],
                    error_estimate=worst[member][1],
                    seconds=round(seconds * self.infos[member][0][0] / total_rows, 4),
                    grams=first["stats"],
                    **({"factor_reused": True} if reused else {}),
                )
            )
        self.system = system
        if picks:  # the output error figures: each gram read again, one at a time
            by_member = {}
            for (member, _), pick in picks.items():
                by_member.setdefault(member, []).append(pick)
            with self.timer("figures"):
                figures = group_error_figures(grams, by_member, {m: self.infos[m][0][0] for m in by_member}, self.coefs)
            for row in report:
                row["output_error"] = figures[row["tensor"]]
        return report, kept

    def chunk_pass(
        self,
        chunk: list[tuple[str, tuple[int, int]]],
        grams: Callable[[int], Tensor],
        n: int,
        alpha: float,
        wide: bool,
        system: RegMeanSystem | None = None,
        first: dict | None = None,
        picks: dict | None = None,
        steps: dict[str, int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One pass over the experts for a chunk of rows [(weight, (start, stop))]: expert i's gram (added to
        `system` when given) and its rows of the chunk, one expert at a time. Returns the first expert's rows
        and the sums of solver.solve_deviation. first (the group's first pass): the grams' stats and digests
        are taken there; picks: the sampled rows of the output error figures (steps: their spacing per weight)."""
        size = sum(b - a for _, (a, b) in chunk)
        rhs, spread = deviation_sums(size, n, wide, self.device)
        anchor = None
        for i, expert in enumerate(self.experts):
            with self.timer("load"):
                gram = grams(i).to(self.device, torch.float32)
                rows, start = torch.empty(size, n, device=self.device), 0
                for member, (a, b) in chunk:
                    rows[start : start + b - a] = expert.read(member, (a, b))
                    start += b - a
            if first is not None:
                first["stats"].append(gram_stats(gram, first["tokens"][i]))
                if first["digests"] is not None:
                    first["digests"].append(hashlib.blake2b(gram.cpu().numpy()).digest())
            start = 0
            for member, (a, b) in chunk if picks is not None and steps else []:
                picks.setdefault((member, a), []).append(
                    rows[start : start + b - a][block_slice((a, b), steps[member])].clone()
                )
                start += b - a
            with self.timer("solve"):
                if system is not None:
                    system.add_gram(i, gram)
                if i == 0:
                    anchor = rows
                else:
                    add_deviation(rhs, spread, gram, self.coefs[i], alpha, rows.sub_(anchor))
            del gram, rows
        return anchor, spread, rhs

    def held_group(
        self,
        members: list[str],
        grams: list[Tensor],
        tokens: list[int | None],
        keep: bool,
        family: list | None,
        alpha: float,
    ) -> tuple[list[dict], dict[str, Tensor]]:
        """--solve reference: the group merged on its N grams held at once, as the reference did (one
        solver.ReferenceSystem), block by block of rows. Arguments and result as linear_group's."""
        infos, kept = self.infos, {}
        t0 = time.perf_counter()
        stats = [gram_stats(g, n) for g, n in zip(grams, tokens)]
        digests = [hashlib.blake2b(g.cpu().numpy()).digest() for g in grams] if family is not None else None
        system = next((s for d, a, s in family or [] if a == alpha and d == digests), None)
        reused = system is not None
        if not reused:
            with self.timer("solve"):
                system = ReferenceSystem.factor(grams, alpha, self.coefs, self.device)
            if family is not None:
                family.append((digests, alpha, system))
        self.system = system
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
                        blocks = [e.read(member, rows).to(self.device, torch.float32) for e in self.experts]
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
                    alpha=alpha,
                    n=system.n,
                    **system.diagnostics(),
                    residual=worst_residual,
                    error_estimate=worst_error,
                    seconds=round(time.perf_counter() - t0 + factor_s, 4),
                    grams=stats,
                    **({"factor_reused": True} if reused else {}),
                )
            )
            factor_s = 0.0  # the factorization is counted once, with the first layer of its group
        if picks:
            with self.timer("figures"):
                figures = group_error_figures(
                    system.grams.__getitem__, picks, {m: infos[m][0][0] for m in picks}, self.coefs
                )
            for row in report:
                row["output_error"] = figures[row["tensor"]]
        return report, kept


def chunk_blocks(blocks: list[tuple[str, tuple[int, int]]], max_rows: int) -> list[list]:
    """Consecutive blocks of rows [(weight, (start, stop))] in chunks of at most max_rows rows (a block
    never split): the rows a streamed pass over the experts solves at once."""
    chunks, size = [], max_rows
    for member, (a, b) in blocks:
        if size + b - a > max_rows:
            chunks.append([])
            size = 0
        chunks[-1].append((member, (a, b)))
        size += b - a
    return chunks


def gram_groups(gram_files: list[GramFile], linear: dict[str, int]) -> dict[tuple[str, ...], list[str]]:
    """{gram keys (one per expert): the weight names that read that input}, in checkpoint order."""
    groups = {}
    for module in linear:
        key = tuple(g.key_of[module] for g in gram_files)
        groups.setdefault(key, []).append(module + ".weight")
    return groups


def gram_families(gram_files: list[GramFile], groups: dict[tuple[str, ...], list[str]]) -> dict[tuple, list[tuple]]:
    """{first group key: the group keys of its family}: groups of one parent module (self_attn, mlp) whose grams
    have the same shape in every file, in order. Their grams may be copies of one another: the reference's
    gram.pkl holds q/k/v's (and gate/up's) three times over, bit for bit, where gram.safetensors stores one."""
    families = {}
    for key, names in groups.items():
        parent = names[0].rsplit(".", 2)[0]
        families.setdefault((parent, tuple(g.shape(k) for g, k in zip(gram_files, key))), []).append(key)
    return {keys[0]: keys for keys in families.values()}


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
    families = gram_families(gram_files, groups)
    family_of = {key: first for first, keys in families.items() for key in keys}
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
        family = []  # (digests, α, system) of the family's groups so far: identical grams are factored once
        keys = families[family_of[group_of[name]]]
        for key in keys:
            alpha = merge.alphas[key[0]] if merge.alphas is not None else None

            def read(i: int, key: tuple[str, ...] = key) -> Tensor:
                return gram_files[i].get(key[i])

            rows, _ = merge.linear_group(
                groups[key], read, tokens, family=family if len(keys) > 1 else None, alpha=alpha
            )
            report += [dict(r, gram=key[0]) for r in rows]
            done.update(groups[key])
            bar.update(len(groups[key]))
        del family
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
    reused = sum(1 for r in report if r.get("factor_reused"))
    return (
        f"{len(report)} linear layers; paths "
        + ", ".join(f"{k} {v}" for k, v in sorted(paths.items()))
        + f"; {sum(r['unexcited'] for r in short)} input directions left at the average in {len(short)} layers"
        + f"; max relative residual {max(r['residual'] for r in report):.2e}"
        + f"; max estimated relative error {max(r['error_estimate'] for r in report):.2e}"
        + (f"; {reused} layers read a gram identical to another's, factored once" if reused else "")
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
    merged: Expert,
    experts: list[Expert],
    coefs: list[float],
    gram_files: list[GramFile],
    linear: dict[str, int],
    device: torch.device,
    sample_every: int = SAMPLE_EVERY,
    block_mb: float = BLOCK_MB,
) -> list[dict]:
    """The output error figures of an existing merged model (a dense folder, or a LoRA adapter folded into its
    base as read, as experts are) against the experts, for every linear layer in `linear`, on the same sampled
    rows as a merge takes them. Returns one report row per weight: tensor, gram, output_error."""
    infos, report = experts[0].infos, []
    groups = gram_groups(gram_files, linear)
    bar = Progress(total=sum(len(v) for v in groups.values()), desc="judging", unit="layer")
    for key, members in groups.items():
        picks = {}
        for member in members:
            step = sample_step(infos[member][0][0], sample_every)
            for rows in row_blocks(infos[member][0], block_mb):
                if block_slice(rows, step).start >= rows[1] - rows[0]:
                    continue  # no sampled row in this block
                blocks = [e.read(member, rows).to(device) for e in experts]
                merged_rows = merged.read(member, rows).to(device)
                picks.setdefault(member, []).append(pick_rows(blocks, merged_rows, rows, step))
            bar.update(1)
        figures = group_error_figures(
            lambda i, key=key: gram_files[i].get(key[i]), picks, {m: infos[m][0][0] for m in members}, coefs
        )
        report += [dict(tensor=m, gram=key[0], output_error=figures[m]) for m in members]
    bar.close()
    return report

"""`--output-format adapter`: the merge of N LoRA adapters of one base, written as one PEFT LoRA adapter of rank
R = Σrᵢ, exactly (docs/merging.md, "LoRA adapters"). With Wᵢ = W₀ + sᵢBᵢAᵢ and Σ = Σⱼ cⱼG̃ⱼ, RegMean's answer is
W₀ + ΔW with ΔWᵀ = Σᵢ [Σ⁻¹ cᵢG̃ᵢAᵢᵀ](sᵢBᵢ)ᵀ: a LoRA whose A stacks the rows Aᵢ carried through the solve and
whose B sets the sᵢBᵢ side by side (scaling 1). The solve is the dense merge's own (solver.RegMeanSystem: same
ridge, same fallbacks, directions the data never excites keep the average), on R right-hand rows instead of the
`out` rows of W, and it is linear row by row, so that the folded adapter is the dense merge. The average is the
same LoRA with Aᵢ scaled by cᵢ. A module only some adapters adapt gets zero factors from the others.

    tensors, config, report = adapter_merge(experts, coefs, alpha, gram_files, linear, averaged, device)
"""

import json
import time
from pathlib import Path

import torch

from .experts import Expert, linear_weight_names
from .merging import gram_groups
from .recipe import card_section
from .solver import RegMeanSystem
from .tensor_io import GramFile, read_tensor
from .utils import UserError

PREFIX = "base_model.model."


def check_adapter_output(experts: list[Expert], method: str) -> None:
    """--output-format adapter takes LoRA experts only, without modules_to_save, merged by avg or regmean."""
    dense = next((e for e in experts if e.lora is None), None)
    if dense is not None:
        raise UserError(
            f"--output-format adapter needs every expert to be a LoRA adapter, and {dense.spec} is a dense model "
            "(--output-format dense merges them)"
        )
    saving = next((e for e in experts if e.lora.saved), None)
    if saving is not None:
        names = ", ".join(sorted(saving.lora.saved))
        raise UserError(
            f"--output-format adapter: {saving.lora.dir} saves whole modules ({names}, modules_to_save), which "
            "an adapter output does not merge; use --output-format dense"
        )
    for e in experts:  # peft's copies of base layers (save_embedding_layers) must be the base's: they are not written
        for name, key in e.lora.base_saved.items():
            if not torch.equal(read_tensor(e.lora.file, key), read_tensor(e.files[name], name)):
                raise UserError(
                    f"--output-format adapter: {e.lora.dir} holds its own {name} (other than the base's); "
                    "use --output-format dense"
                )
    if method == "regmean++":
        raise UserError("--output-format adapter is for avg and regmean (regmean++ writes a dense folder)")


def lora_modules(experts: list[Expert]) -> list[str]:
    """The modules any expert adapts, in the base checkpoint's order."""
    adapted = {m for e in experts for m in e.lora.modules}
    return [n.removesuffix(".weight") for n in experts[0].infos if n.removesuffix(".weight") in adapted]


def expert_rows(experts: list[Expert], module: str, n_in: int, device) -> list[torch.Tensor]:
    """Each expert's right-hand rows for one module: [R, in] float32, its Aᵢ in its own slice of the R rows,
    zeros elsewhere (and where it does not adapt the module)."""
    ranks = [e.lora.rank for e in experts]
    total, rows, start = sum(ranks), [], 0
    for e, r in zip(experts, ranks):
        x = torch.zeros(total, n_in, device=device)
        if module in e.lora.modules:
            a = e.lora.a(module)
            x[start : start + len(a)] = a.to(device)
        rows.append(x)
        start += r
    return rows


def stacked_b(experts: list[Expert], module: str, n_out: int) -> torch.Tensor:
    """[out, R]: the sᵢBᵢ side by side, zero where an expert does not adapt the module."""
    blocks = []
    for e in experts:
        b = torch.zeros(n_out, e.lora.rank)
        if module in e.lora.modules:
            _, sb = e.lora.factors(module)
            b[:, : sb.shape[1]] = sb
        blocks.append(b)
    return torch.cat(blocks, 1)


def adapter_merge(
    experts: list[Expert],
    coefs: list[float],
    alpha: float,
    gram_files: list[GramFile],
    linear: dict[str, int],
    averaged: frozenset[str],
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The merged LoRA's tensors {peft key: tensor} and a report row per module. Modules with grams in `linear`
    (and not in `averaged`, weight names) are solved; the others (and all, with no gram files: avg) are the
    weighted average. Grams of a group of modules that read one input are factored once."""
    modules = lora_modules(experts)
    infos = experts[0].infos
    solved = {m: linear[m] for m in modules if m in linear and f"{m}.weight" not in averaged}
    tensors, report = {}, []

    def put(module: str, a: torch.Tensor) -> None:
        n_out = infos[f"{module}.weight"][0][0]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.float().cpu().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = stacked_b(experts, module, n_out).contiguous()

    for module in modules:
        if module not in solved:
            rows = expert_rows(experts, module, infos[f"{module}.weight"][0][1], "cpu")
            put(module, sum(c * x for c, x in zip(coefs, rows)))
            report.append(dict(tensor=f"{module}.weight", path="average"))
    for key, members in gram_groups(gram_files, solved).items():
        t0 = time.perf_counter()
        grams = [g.get(k) for g, k in zip(gram_files, key)]
        total = sum(e.lora.rank for e in experts)
        system = RegMeanSystem.factor(grams, alpha, coefs, device, num_rows=total * len(members))
        for name in members:
            module = name.removesuffix(".weight")
            merged, residual, error = system.solve(expert_rows(experts, module, solved[module], device))
            put(module, merged)
            report.append(
                dict(
                    tensor=name,
                    gram=key[0],
                    n=system.n,
                    **system.diagnostics(),
                    residual=residual,
                    error_estimate=error,
                    seconds=round(time.perf_counter() - t0, 4),
                )
            )
            t0 = time.perf_counter()
        del grams, system
    return tensors, report


def target_modules(experts: list[Expert], modules: list[str]) -> list[str]:
    """The merged adapter's target_modules: the union of the experts' names (q_proj, v_proj, ...) when those
    name exactly the modules adapted, else the modules' full names."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    linear = linear_weight_names(experts[0].dir, experts[0].infos)
    if {n for n in linear if n.rsplit(".", 1)[-1] in suffixes} == set(modules):
        return suffixes
    return list(modules)


def adapter_config(experts: list[Expert], modules: list[str], base: str):
    """The merged adapter's LoraConfig: rank R = Σrᵢ, lora_alpha R (scaling 1: the sᵢ are in B)."""
    from peft import LoraConfig

    rank = sum(e.lora.rank for e in experts)
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=target_modules(experts, modules),
        base_model_name_or_path=base,
        task_type=experts[0].lora.config.get("task_type"),
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,
    )


def write_adapter_card(
    out: Path, base: str, method: str, alpha: float, experts: list[Expert], coefs, rank: int, recipe, argv, card
):
    """README.md of the merged adapter: base_model, tags merge, lora and the method, what it is, the recipe."""
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: peft",
        "tags:",
        "- merge",
        "- lora",
        f"- {method}",
        "---",
        "",
        f"# {out.name if out.name else 'merged adapter'}",
        "",
        f"A LoRA adapter of rank {rank} on `{base}`: the {method} merge"
        + (f" (alpha {alpha})" if method != "avg" else "")
        + f" of {len(experts)} LoRA adapters, exactly (its folded weights are the dense merge's), made by "
        "`merge_model.py --output-format adapter`.",
        "",
        "| adapter | rank | weight |",
        "|---|---|---|",
        *[f"| {e.spec} | {e.lora.rank} | {c:.4g} |" for e, c in zip(experts, coefs)],
        "",
        "Load it with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_FOLDER)`.",
        "",
        f"Command: `python merge_model.py {' '.join(argv)}`",
        "",
        *card_section(recipe, card),
    ]
    (out / "README.md").write_text("\n".join(lines))


def write_adapter_merge(s, experts, coefs, weights, inputs, device, out_dir: Path, argv, timer) -> Path:
    """merge.merge with --output-format adapter: the merged LoRA (adapter_model.safetensors, adapter_config.json),
    its model card and merge_report.json, under a temporary name renamed when complete. Returns the folder."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from .recipe import recipe_of
    from .utils import atomic_dir, peak_memory

    modules = lora_modules(experts)
    rank = sum(e.lora.rank for e in experts)
    base = experts[0].lora.base_spec
    averaged = frozenset(m + ".weight" for m in inputs.excluded)
    print(
        f"merging {len(experts)} LoRA adapters of {base} by {s.method} into one LoRA adapter of rank {rank} "
        f"({len(modules)} modules, {sum(m in inputs.linear for m in modules)} with grams) -> {out_dir}"
    )
    with timer("solve"):
        tensors, report = adapter_merge(experts, coefs, s.alpha, inputs.gram_files, inputs.linear, averaged, device)
    recipe = recipe_of(asdict(s), weights, "float32", inputs.gram_paths)
    with atomic_dir(out_dir, overwrite=s.overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        adapter_config(experts, modules, base).save_pretrained(str(tmp))
        write_adapter_card(tmp, base, s.method, s.alpha, experts, coefs, rank, recipe, argv, out_dir / "README.md")
        merge_report = dict(
            settings=dict(asdict(s), weights=weights, output_dir=str(out_dir), device=str(device)),
            command="python merge_model.py " + " ".join(argv),
            experts=[
                dict(model=e.spec, adapter=str(e.lora.dir), base=str(e.dir), rank=e.lora.rank, weight=c)
                for e, c in zip(experts, coefs)
            ],
            rank=rank,
            grams=inputs.provenance,
            recipe=recipe,
            excluded=dict(patterns=s.exclude or [], modules=inputs.excluded),
            figures=dict(wall_s=round(timer.total(), 3), peak_memory=peak_memory(device)),
            layers=report,
        )
        (tmp / "merge_report.json").write_text(json.dumps(merge_report, indent=2) + "\n")
    print(f"done in {timer.total():.1f}s: a LoRA adapter of rank {rank}, {peak_memory(device)} -> {out_dir}")
    return out_dir

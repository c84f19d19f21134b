"""The experts of a merge and their inputs, checked before any work: each expert's tensors (read
lazily from its safetensors files), their weights, shapes, vocabularies and dtypes against each
other, the gram files against the experts they claim to describe, and which linear layers are
solved (their grams present, not excluded).

    experts = load_experts(["code", "math"])
    gram_files = open_gram_files(experts, resolve_gram_paths(["code", "math"], None))
    linear = linear_modules(experts[0].infos, gram_files)
"""

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import Lora, adapter_config, adapter_spec, load_lora, resolve_base
from .tensor_io import (
    ST_DTYPES,
    GramFile,
    checkpoint_files,
    config_fingerprint,
    model_fingerprint,
    read_tensor,
    tensor_infos,
)
from .utils import PRESETS, UserError, first_line, natural_key, resolve_model_dir


@dataclass
class Expert:
    spec: str  # as given: a preset name, a folder or a hub id
    dir: Path
    config: dict  # config.json
    files: dict[str, Path]  # tensor name -> safetensors file
    infos: dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)
    lora: Lora | None = None  # a LoRA expert: dir, files and infos are its base's, the adapter folded in as read

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows `rows` (all when None) of the expert's tensor `name`; a LoRA expert's folded into its base."""
        w = read_tensor(self.files[name], name, rows)
        return self.lora.fold(name, w, rows) if self.lora else w

    def fingerprint(self) -> str:
        """What gram files record of their model (tensor_io.model_fingerprint; a LoRA's: base and adapter)."""
        if not hasattr(self, "_fingerprint"):
            base = model_fingerprint(self.files)
            self._fingerprint = self.lora.fingerprint(base) if self.lora else base
        return self._fingerprint

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


def load_expert(spec: str, base: str | None = None) -> Expert:
    """One model's folder, config and tensor layout; a LoRA adapter (a folder, or BASE+ADAPTER; its base
    from `base` else its config) as its base's, with the adapter to fold in."""
    lora_spec = adapter_spec(spec, base)
    if lora_spec is not None:
        config = adapter_config(lora_spec[1])
        model_dir = resolve_base(lora_spec[1], lora_spec[0], config)
    else:
        model_dir = resolve_model_dir(spec)
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise UserError(f"{model_dir} has no config.json")
    files = checkpoint_files(model_dir)
    expert = Expert(spec, model_dir, json.loads(config_file.read_text()), files, tensor_infos(files))
    if lora_spec is not None:
        expert.lora = load_lora(lora_spec[1], model_dir, config, expert.infos, lora_spec[0])
    return expert


def check_one_base(experts: list[Expert]) -> None:
    """Every LoRA expert's base is one model (by fingerprint), and the one it names when that is a folder
    here: an adapter of another base is refused, by name."""
    prints = {}

    def fingerprint(model_dir: Path) -> str:
        if model_dir.resolve() not in prints:
            prints[model_dir.resolve()] = model_fingerprint(checkpoint_files(model_dir))
        return prints[model_dir.resolve()]

    loras = [e for e in experts if e.lora]
    for e in loras:
        named = e.lora.config.get("base_model_name_or_path")
        if named and Path(named).is_dir() and fingerprint(Path(named)) != fingerprint(e.dir):
            raise UserError(
                f"{e.lora.dir} is an adapter of {named} (its base_model_name_or_path), not of {e.dir}, the base "
                "it was given"
            )
        if fingerprint(e.dir) != fingerprint(loras[0].dir):
            raise UserError(
                f"{e.lora.dir} is an adapter of {e.dir}, another base than {loras[0].dir} (the base of "
                f"{loras[0].lora.dir}): the adapters of a merge must share one base"
            )


def load_experts(specs: list[str], base: str | None = None) -> list[Expert]:
    """Each model's folder, config and tensor layout, checked to share one architecture and the
    same tensor names and shapes; LoRA experts (adapter folders or BASE+ADAPTER, `base`: --base) to share
    one base."""
    experts = [load_expert(spec, base) for spec in specs]
    check_one_base(experts)
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
            mine[j] = (experts[j].fingerprint(), config_fingerprint(experts[j].config))
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

"""Merge recipes: a YAML file in the shape mergekit users know, read into merge settings, and the
settings of a merge written back as one (its model card carries it, so a merged folder can be made
again from its own card: `python merge_model.py --config MERGED/README.md --output-dir AGAIN`).

    merge_method: regmean            # avg, regmean or regmean++
    models:                          # each: model, and grams (regmean) or dataset + format (regmean++)
      - model: code
        grams: runs/merges/code-llama3/gram.safetensors
        weight: 1.0
      - model: math
        grams: runs/merges/math-llama3/gram.safetensors
        weight: 1.0
    parameters:
      alpha: 0.1
      exclude: [lm_head]             # regular expressions: linear layers averaged, not solved
    dtype: bfloat16

    settings = read_recipe("recipe.yml")   # {MergeSettings field: value}, checked
    recipe = recipe_of(asdict(merge_settings), weights, "bfloat16", gram_paths)  # a merge as run
    lines = card_section(recipe, "runs/merges/regmean_0.1/README.md")  # the card's section, read back
"""

import re
import shlex
from pathlib import Path

import yaml

from .utils import DTYPES, MERGE_METHODS, UserError, did_you_mean, first_line, nth

# recipe key of each model entry -> the merge setting holding one value per model
MODEL_KEYS = {"model": "models", "grams": "grams", "weight": "weights", "dataset": "datasets", "format": "formats"}
# parameters -> their type (a float also takes an int)
PARAMETERS = {
    "alpha": float,
    "alphas": dict,  # α per input (its first linear layer -> α), as an --alpha auto merge chose them
    "exclude": list,
    "allow_gram_mismatch": bool,
    "split": str,  # regmean++ calibration data, as merge_model.py's options of the same names
    "num_examples": int,
    "max_length": int,
    "batch_size": int,
    "forward_dtype": str,
    "max_hidden_gb": float,
    "solve": str,  # regmean: ours or reference (merge_model.py --solve)
    "output_format": str,  # adapter: the merge of LoRA adapters written as one (regmean/lora_merge.py)
}
TOP_KEYS = ("merge_method", "models", "parameters", "dtype")
CARD_RECIPE = re.compile(r"^## Recipe\n.*?^```yaml\n(.*?)^```", re.M | re.S)


def check_keys(where: str, given, known) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")


def typed(where: str, value, kind):
    """A parameter's value checked against its type; exclude takes one pattern or a list."""
    if kind is list:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise UserError(f"{where}: expected a regular expression or a list of them, got {value!r}")
    if kind is dict:
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
        ):
            return {k: float(v) for k, v in value.items()}
        raise UserError(f"{where}: expected a mapping of linear layer names to numbers, got {value!r}")
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def recipe_settings(recipe, source: str) -> dict:
    """A parsed recipe -> {MergeSettings field: value}; anything unknown or mistyped is refused,
    naming the file and the key."""
    if not isinstance(recipe, dict):
        raise UserError(f"{source}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    check_keys(source, recipe, TOP_KEYS)
    out = {}
    if "merge_method" in recipe:
        if recipe["merge_method"] not in MERGE_METHODS:
            raise UserError(f"{source}: merge_method must be one of {', '.join(MERGE_METHODS)}")
        out["method"] = recipe["merge_method"]
    models = recipe.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, dict) and "model" in m for m in models):
            raise UserError(f"{source}: models must be a list of entries, each with a `model`")
        where = [f"{source}: the {nth(i)} model ({m['model']})" for i, m in enumerate(models)]  # counted from 1
        for i, m in enumerate(models):
            check_keys(where[i], m, [*MODEL_KEYS, "parameters"])
            if "parameters" in m:  # mergekit writes a model's weight as `parameters: {weight: w}`
                check_keys(f"{where[i]}, parameters", m["parameters"] or {}, ["weight"])
                models[i] = {k: v for k, v in m.items() if k != "parameters"} | (m["parameters"] or {})
        for key, setting in MODEL_KEYS.items():
            given = [m[key] for m in models if key in m]
            if given and len(given) != len(models):
                raise UserError(f"{source}: `{key}` is given for {len(given)} of {len(models)} models (all or none)")
            if given:
                kind = float if key == "weight" else str
                out[setting] = [typed(f"{where[i]}, {key}", v, kind) for i, v in enumerate(given)]
    parameters = recipe.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise UserError(f"{source}: parameters must be a mapping")
    check_keys(f"{source}: parameters", parameters, PARAMETERS)
    for key, value in parameters.items():
        out[key] = typed(f"{source}: parameters.{key}", value, PARAMETERS[key])
    if "dtype" in recipe:
        if recipe["dtype"] not in ("auto", *DTYPES):
            raise UserError(f"{source}: dtype must be one of auto, {', '.join(DTYPES)}")
        out["dtype"] = recipe["dtype"]
    return out


def read_recipe(path: str | Path) -> dict:
    """A recipe file, or a merged folder's README.md model card (its `## Recipe` block), ->
    {MergeSettings field: value}."""
    path = Path(path)
    if path.is_dir():
        path = path / "README.md"
    if not path.is_file():
        raise UserError(f"--config {path} does not exist{did_you_mean(path)}")
    text = path.read_text()
    if path.suffix == ".md":
        found = CARD_RECIPE.search(text)
        if not found:
            raise UserError(f"{path} holds no recipe (a `## Recipe` section with a yaml block)")
        text = found.group(1)
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({first_line(e)})") from e
    return recipe_settings(recipe, str(path))


def recipe_of(
    settings: dict,
    weights: list[float],
    dtype: str,
    gram_paths: list[str] | None = None,
    calibration: list[dict] | None = None,
    forward_dtype: str | None = None,
) -> dict:
    """The recipe of a merge as it was run, every value resolved: settings are asdict of regmean/merge.py's
    MergeSettings, calibration regmean++'s data provenance per expert."""
    parameters = {} if settings["method"] == "avg" else dict(alpha=settings["alpha"])
    if settings.get("alphas") and settings["method"] == "regmean":  # every input's own α: they remake the merge
        parameters = dict(alphas=dict(settings["alphas"]))
    if settings.get("exclude"):
        parameters["exclude"] = settings["exclude"]
    if settings.get("solve", "ours") != "ours":
        parameters["solve"] = settings["solve"]
    if settings.get("allow_gram_mismatch"):
        parameters["allow_gram_mismatch"] = True
    if settings.get("output_format", "dense") != "dense":
        parameters["output_format"] = settings["output_format"]
    if calibration:
        parameters.update({k: settings[k] for k in ("split", "num_examples", "max_length", "batch_size")})
        parameters["forward_dtype"] = forward_dtype
    entries = []
    for i, model in enumerate(settings["models"]):
        entry = dict(model=model)
        if gram_paths:
            entry["grams"] = gram_paths[i]
        if calibration:
            entry.update(dataset=calibration[i]["dataset"], format=calibration[i]["row_format"])
        entry["weight"] = weights[i]
        entries.append(entry)
    recipe = dict(merge_method=settings["method"], models=entries, parameters=parameters, dtype=dtype)
    recipe_settings(recipe, "the recipe written")  # what is written reads back
    return recipe


def recipe_yaml(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)


def card_section(recipe: dict, card: str | Path = "README.md") -> list[str]:
    """The model card's `## Recipe` section, which read_recipe finds again; `card` is the card's path as the
    merge was given it, so that the command shown runs from where the merge ran."""
    return [
        "## Recipe",
        "",
        f"`python merge_model.py --config {shlex.quote(str(card))} --output-dir DIR` makes this merge again, run "
        "from where this one ran (the paths below are as given there):",
        "",
        "```yaml",
        recipe_yaml(recipe).rstrip(),
        "```",
        "",
    ]

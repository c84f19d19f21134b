"""RegMean merging of LLMs fine-tuned from one base: the library under the stage scripts.

    from regmean import compute_grams, merge, judge

    grams = compute_grams("runs/toy/toy-code", "runs/toy/data/code_calib.jsonl", "code", "runs/toy/grams/toy-code")
    folder = merge("regmean", models=["runs/toy/toy-code", "runs/toy/toy-math"], grams=[grams, ...], alpha=0.1)
    report = judge(folder)
    evaluate([folder], tasks=["toy_code"]); print(results_table([folder]))

Each function is one stage of the pipeline, with the command line's settings as keywords and its defaults
(docs/api.md); the modules below them (regmean.solver, regmean.merging, ...) are the machinery.
"""

from .evaluation import evaluate
from .grams import compute_grams
from .judge import judge
from .merge import MergeSettings, merge
from .results import results_table

__all__ = ["compute_grams", "merge", "MergeSettings", "judge", "evaluate", "results_table"]

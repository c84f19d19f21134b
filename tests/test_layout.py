"""The layout's arrows point down: stage scripts -> library modules -> utils. Read from the
sources' import statements, so a new import that points up or sideways fails here."""

import ast

from conftest import ROOT

STAGES = ["compute_gram", "merge_model", "evaluate", "judge_merge"]  # demo.py runs them all, on purpose
LIBRARY = [
    "regmeanpp",
    "merging",
    "experts",
    "merge_report",
    "model_card",
    "recipe",
    "finetune",
    "layerwise",
    "regmean",
    "calibration",
    "tensor_io",
    "seed_pickle",
]  # each may use those after it
LOCAL = {*STAGES, "demo", *LIBRARY, "utils"}


def local_imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & LOCAL


def test_no_stage_imports_another():
    for stage in STAGES:
        assert not local_imports(stage) & {*STAGES, "demo"}, stage


def test_library_modules_import_only_below_them():
    for i, module in enumerate(LIBRARY):
        assert local_imports(module) <= {*LIBRARY[i + 1 :], "utils"}, module
    assert local_imports("utils") == set()
    assert local_imports("regmean") == set()  # the math reads on its own


def test_no_module_over_600_lines():
    """The yardstick of the developers' guide, for the library, the scripts, the benchmarks and the tests alike."""
    too_long = {}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]:
        lines = len(path.read_text().splitlines())
        if lines > 600:
            too_long[str(path.relative_to(ROOT))] = lines
    assert not too_long, f"split these by topic: {too_long}"

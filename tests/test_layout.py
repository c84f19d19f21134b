"""The layout's arrows point down: stage scripts -> the regmean package -> its utils. Read from the
sources' import statements, so a new import that points up or sideways fails here."""

import ast

from conftest import ROOT

STAGES = ["compute_gram", "merge_model", "evaluate", "judge_merge"]  # demo.py runs them all, on purpose
SCRIPTS = [*STAGES, "demo", "smollm2", "utils"]  # the root: the stage scripts and what only they share
PACKAGE = [  # regmean/: each module may use those after it
    "grams",
    "model_plan",
    "merge",
    "lora_merge",
    "judge",
    "evaluation",
    "results",
    "regmeanpp",
    "merging",
    "alpha_choice",
    "experts",
    "adapters",
    "merge_report",
    "model_card",
    "recipe",
    "finetune",
    "layerwise",
    "solver",
    "calibration",
    "tensor_io",
    "seed_pickle",
    "ranks",
    "utils",
]


def imports(path) -> set[str]:
    """The project's modules a file imports: root scripts by name, package modules as `regmean.NAME`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y, from . import x
                base = f"regmean.{node.module}" if node.module else "regmean"
            else:
                base = node.module or ""
            names |= {base} if base != "regmean" else {f"regmean.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in {*SCRIPTS, "regmean"}}


def package_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "regmean").glob("*.py") if p.stem != "__init__")


def test_every_package_module_has_its_floor():
    assert set(package_modules()) <= set(PACKAGE), set(package_modules()) - set(PACKAGE)


def test_no_stage_imports_another():
    for stage in STAGES:
        assert not {n for n in imports(ROOT / f"{stage}.py") if n in {*STAGES, "demo"}}, stage


def test_the_package_imports_nothing_from_the_root():
    for path in (ROOT / "regmean").glob("*.py"):
        assert all(n.startswith("regmean") for n in imports(path)), path


def test_package_modules_import_only_below_them():
    for i, module in enumerate(PACKAGE):
        path = ROOT / f"regmean/{module}.py"
        if path.exists():
            below = {f"regmean.{m}" for m in PACKAGE[i + 1 :]}
            assert imports(path) <= below, (module, imports(path) - below)
    assert imports(ROOT / "regmean/solver.py") == set()  # the math reads on its own


def test_no_module_over_600_lines():
    """The yardstick of the developers' guide, for the package, the scripts, the benchmarks and the tests alike."""
    too_long = {}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("regmean/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]:
        lines = len(path.read_text().splitlines())
        if lines > 600:
            too_long[str(path.relative_to(ROOT))] = lines
    assert not too_long, f"split these by topic: {too_long}"

"""The results table of stage 3: lm_eval's result files in model folders -> one row per folder, one column per
task, as markdown (results.md) and a grouped bar chart (results.png).

    markdown = results_table(["runs/merges/avg", "runs/merges/regmean_0.1"], output_dir="runs/merges")
    results_table({"Average": avg_dir}, experts={"Code expert": code_dir, "Math expert": math_dir}, mean_column=True)

Scores come from each folder's newest result file per task (folder/lm_eval_results_preds/*/results_*.json), in
percent. Columns by default: the seed's four tasks first and in its order when present, then any other task by
name with its first metric (docs/evaluation.md#the-table). Rows: the base, the experts, then the folders; with
experts, a second block gives every score as a percentage of the best expert's on its task
(docs/evaluation.md#normalized-scores), and results.png shows those.
"""

import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .utils import UserError, did_you_mean, merge_label, temporary_of

RESULTS_DIR = "lm_eval_results_preds"  # lm_eval's --output_path inside each model folder
# Where the results of a model folder that cannot be written to go (a read-only model store), relative to where
# evaluate.py runs: STAND_INS/NAME-HASH/lm_eval_results_preds, HASH from the folder's absolute path.
STAND_INS = Path("runs/eval-results")
TABLE_FILES = ("results.md", "results.png")  # what the table writes

Column = tuple[str, str, str, list[str]]  # (title, metric label, lm_eval task, result keys tried in order)
SEED_COLUMNS: list[Column] = [  # the seed's table
    ("GSM8k (Math)", "5-shot EM", "gsm8k", ["exact_match,strict-match"]),
    ("MathQA (Math)", "0-shot Acc-norm", "mathqa", ["acc_norm,none"]),
    (
        "HumanEval-Instruct (Code)",
        "0-shot Pass@1",
        "humaneval_instruct",
        ["pass@1,create_test", "pass_at_1,create_test"],
    ),
    ("MBPP (Code)", "3-shot Pass@1", "mbpp", ["pass_at_1,none", "pass@1,none"]),
]
Found = tuple[dict[str, dict], dict[str, int], set[str]]  # a folder's {task: metrics}, {task: n-shot}, subtasks


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- reading lm_eval's files
def results_dir(folder: str | Path) -> Path:
    """Where a model folder's lm_eval results are: folder/lm_eval_results_preds, unless the folder cannot be
    written to and holds none, then STAND_INS/NAME-HASH/lm_eval_results_preds (the same folder every time)."""
    folder = Path(folder)
    own = folder / RESULTS_DIR
    if own.is_dir() or not folder.is_dir() or os.access(folder, os.W_OK):
        return own
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    return STAND_INS / f"{folder.name}-{key}" / RESULTS_DIR


def result_files(folder: str | Path) -> list[Path]:
    """The folder's lm_eval result files, oldest first (file names carry lm_eval's timestamp)."""
    return sorted(results_dir(folder).glob("*/results_*.json"), key=lambda p: p.name)


def read_results(folder: str | Path) -> Found:
    """What a folder's lm_eval result files (folder/lm_eval_results_preds/*/results_*.json) hold:
    {task: {metric key: value}}, {task: n-shot} and the subtasks of the groups run, each task taken
    from the newest file holding it (file names carry lm_eval's timestamp). Empty without files."""
    files = result_files(folder)
    results, shots, subtasks = {}, {}, set()
    for file in files:
        try:
            data = json.loads(file.read_text())
            results.update(data["results"])
            shots.update(data.get("n-shot") or {})
            subtasks.update(t for group in (data.get("group_subtasks") or {}).values() for t in group)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{file}: not an lm_eval result file ({type(e).__name__}: {e})") from e
    return results, shots, subtasks


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def score(results: dict[str, dict], task: str, keys: list[str]) -> float | None:
    """The first of `keys` found for `task`, in percent; None when the task was not run."""
    metrics = results.get(task, {})
    return next((100 * float(metrics[k]) for k in keys if is_number(metrics.get(k))), None)


def task_name(task: str) -> str:
    """A --tasks entry as the result files name it: a task YAML file's `task`, else the name as given."""
    task = task.strip()
    if task.endswith(".yaml") and Path(task).is_file():
        import yaml

        return (yaml.safe_load(Path(task).read_text()) or {}).get("task", task)
    return task


# ----------------------------------------------------------------------------- rows and columns
def label_for(folder: str | Path) -> str:
    """Row name from a merge folder's name: avg -> Average, regmean_0.1 -> RegMean (α=0.1),
    regmeanpp_0.1 -> RegMean++ (α=0.1), anything else as is."""
    return merge_label(Path(folder).name)


def table_rows(folders: Sequence[str | Path] | Mapping[str, str | Path], suffix: str = "") -> list[tuple[str, Path]]:
    """(label, folder) per folder (label_for's name + suffix unless named): a path that is not there is an error
    (with a "did you mean"); a file is skipped, quietly when it is a table this module wrote (`runs/merges/*`
    matches them)."""
    if isinstance(folders, Mapping):
        named = list(folders.items())
    else:
        named = [(label_for(f) + suffix, f) for f in folders]
    rows = []
    for label, path in ((label, Path(f)) for label, f in named):
        if path.is_dir():
            rows.append((label, path))
        elif not path.exists():
            raise UserError(f"{path} is not a folder{did_you_mean(path)}")
        elif path.name not in TABLE_FILES:
            warn(f"{path} is a file, not a model folder: skipped")
    if not rows:
        raise UserError(f"no folder among {' '.join(str(f) for _, f in named)}")
    return rows


def all_rows(folders, experts, base) -> list[tuple[str, Path, str]]:
    """(label, folder, kind) for the base, the experts, then the folders (kind: base, expert, folder); a folder
    already in an earlier group is not repeated in a later one (a folder given that is also an expert is an
    expert's row)."""
    rows, seen = [], set()
    for kind, given, suffix in [("base", base, " (base)"), ("expert", experts, " (expert)"), ("folder", folders, "")]:
        if kind != "folder" and not given:
            continue
        given = [given] if isinstance(given, (str, Path)) else given
        group = [(label, path, kind) for label, path in table_rows(given, suffix) if path.resolve() not in seen]
        seen |= {path.resolve() for _, path, _ in group}
        rows += group
    return rows


def task_column(task: str, metrics: dict, shots: int | None) -> Column | None:
    """A column for a task outside the seed's four: its first metric as lm_eval wrote it (e.g.
    toy_code, "0-shot exact_match"); None when it has none. Metrics are the "metric,filter" keys
    (lm_eval also writes name, alias and sample_len beside them)."""
    key = next((k for k, v in metrics.items() if "," in k and "_stderr," not in k and is_number(v)), None)
    if key is None:
        return None
    metric, _, filt = key.partition(",")
    label = metric if filt in ("", "none") else f"{metric} ({filt})"
    if shots is not None:
        label = f"{shots}-shot {label}"
    return (task, label, task, [key])


def table_columns(found: list[Found], tasks: Sequence[str] | None = None) -> list[Column]:
    """The columns of the tasks the folders hold: the seed's four first, in its order, when present,
    then the others by name (a group's subtasks left out when the group is there). found: each
    folder's read_results; tasks: only these, in this order (evaluate.py --tasks)."""
    held, shots, subtasks = {}, {}, set()
    for results, n_shot, subs in found:
        for task, metrics in results.items():
            held.setdefault(task, metrics)
            shots.setdefault(task, n_shot.get(task))
        subtasks |= subs
    seed = {c[2]: c for c in SEED_COLUMNS}
    if tasks is None:
        tasks = [c[2] for c in SEED_COLUMNS if c[2] in held]
        tasks += sorted(t for t in held if t not in seed and t not in subtasks)
    columns = []
    for task in tasks:
        column = seed[task] if task in seed else task_column(task, held.get(task, {}), shots.get(task))
        if column is None or not any(score(results, task, column[3]) is not None for results, _, _ in found):
            warn(f"no folder holds a score of task {task!r}: no column for it")
            continue
        columns.append(column)
    return columns


# ----------------------------------------------------------------------------- writing
def table_dir(folders: Sequence[str | Path]) -> Path:
    """Where the table goes by default: beside what it read, the folders' common parent (files among the
    paths left out, as the table leaves them out)."""
    paths = [Path(f) for f in folders if not Path(f).is_file()] or [Path(f) for f in folders]
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    return common.relative_to(Path.cwd()) if common.is_relative_to(Path.cwd()) else common


def write_atomic(path: Path, data: bytes) -> None:
    with temporary_of(path) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, path)


def plot(
    labels: list[str],
    ticks: list[str],
    values: list[list[float | None]],
    path: Path,
    ylabel: str = "score (%)",
    line: float | None = None,
) -> None:
    """Grouped bar chart: one group per benchmark, one bar per row; `line`: a dashed horizontal line there (the
    experts' 100%). Uses matplotlib's Figure directly (Agg canvas), so no pyplot state or GUI backend is involved."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.6 * len(ticks) + 0.4 * len(labels)), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    for i, (label, row) in enumerate(zip(labels, values)):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(ticks))]
        bars = ax.bar(xs, [math.nan if v is None else v for v in row], width, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in row], fontsize=7)
    if line is not None:
        ax.axhline(line, color="black", linestyle="--", linewidth=1, label=f"best expert ({line:g}%)")
    ax.set_xticks(range(len(ticks)), ticks)
    top = max([v for row in values for v in row if v is not None] + ([line] if line else []), default=0.0)
    ax.set_ylim(0, max(1.0, top) * 1.1)  # headroom for the value labels
    ax.set_ylabel(ylabel)
    fig.legend(fontsize=8, loc="outside right upper")  # beside the axes: inside, it covered bars and ticks
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(path, buf.getvalue())


def cell(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def markdown_table(labels: list[str], titles: list[str], metrics: list[str], values: list[list[float | None]]) -> str:
    def line(cells):
        return "| " + " | ".join(cells) + " |"

    md = [line(["Method/Benchmark"] + titles), line(["----"] * (len(titles) + 1)), line([""] + metrics)]
    md += [line([label] + [cell(v) for v in row]) for label, row in zip(labels, values)]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- normalized scores
Norm = tuple[str, float] | None  # a task's normalizer: (the best expert's label, its score), None: no expert > 0


def normalized(
    values: list[list[float | None]], labels: list[str], experts: list[int]
) -> tuple[list[Norm], list[list[float | None]]]:
    """Per task column, the best expert (the highest score among the rows `experts`, the first on a tie) and every
    row's score as a percentage of it, then the mean of a row's percentages over the tasks that have one (blank
    when the row lacks one of them). A task where no expert scores above zero has no normalizer (None), no
    percentages and stays out of the mean."""
    by: list[Norm] = []
    for j in range(len(values[0]) if values else 0):
        scored = [i for i in experts if values[i][j] is not None]
        best = max(scored, key=lambda i: values[i][j], default=None)  # max keeps the first of equals
        by.append((labels[best], values[best][j]) if best is not None and values[best][j] > 0 else None)
    table = []
    for row in values:
        ratios = [None if b is None or v is None else 100 * v / b[1] for v, b in zip(row, by)]
        kept = [r for r, b in zip(ratios, by) if b is not None]
        table.append(ratios + [None if not kept or None in kept else sum(kept) / len(kept)])
    return by, table


def normalized_markdown(labels: list[str], titles: list[str], by: list[Norm], values: list[list[float | None]]) -> str:
    """The normalized block: a sentence, the table (its header naming each task's expert) and a note per dash."""

    def line(cells):
        return "| " + " | ".join(cells) + " |"

    n = sum(b is not None for b in by)
    metrics = ["–" if b is None else f"% of {b[0]}, {b[1]:.2f}" for b in by] + [f"mean of {n} task(s)"]
    md = [
        "Normalized: each score as a percentage of the best expert's score on that task, and the mean of those "
        "percentages (docs/evaluation.md#normalized-scores)",
        "",
        line(["Normalized"] + titles + ["Mean"]),
        line(["----"] * (len(titles) + 2)),
        line([""] + metrics),
    ]
    for label, row in zip(labels, values):
        md.append(line([label] + ["–" if b is None else cell(v) for v, b in zip(row, by)] + [cell(row[-1])]))
    notes = [t for t, b in zip(titles, by) if b is None]
    if notes:
        md += ["", f"– {', '.join(notes)}: no expert scores above zero, so no normalized value; left out of the Mean."]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- the table
def results_table(
    folders: Sequence[str | Path] | Mapping[str, str | Path],
    *,
    experts: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    base: str | Path | Mapping[str, str | Path] | None = None,
    columns: Sequence[Column] | None = None,
    tasks: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    mean_column: bool = False,
) -> str:
    """The table of the folders' lm_eval scores, as markdown; with output_dir, also written there as results.md and
    results.png (each whole or not at all).

    folders: model folders (rows named by label_for: avg -> Average) or {row label: folder}; a folder without
    result files is left out with a warning, a file is skipped. experts, base: rows before them (plain folders are
    named NAME (expert), NAME (base)); with experts, a normalized block follows the scores (normalized) and
    results.png shows it, the experts' line at 100%. columns: [(title, metric label, task, [result keys])];
    default: the tasks the folders hold (table_columns), or only `tasks` (names or task YAML files).
    mean_column adds "Mean", the mean of a row's scores (blank unless all are present)."""
    rows = all_rows(folders, experts, base)
    found = {(label, folder): read_results(folder) for label, folder, _ in rows}
    found = {row: results for row, results in found.items() if results[0]}
    kinds = [kind for label, folder, kind in rows if (label, folder) in found]
    if not found:
        raise UserError(
            f"no lm_eval result files in {', '.join(str(f) for _, f, _ in rows)}: "
            f"run python evaluate.py {' '.join(str(f) for _, f, kind in rows if kind == 'folder')} first"
        )
    for _, folder, _ in [row for row in rows if row[:2] not in found]:
        warn(f"{folder} holds no lm_eval results ({results_dir(folder)}/*/results_*.json): left out")
    if columns is None:
        columns = table_columns(list(found.values()), None if tasks is None else [task_name(t) for t in tasks])
    scores = [[score(results, task, keys) for _, _, task, keys in columns] for results, _, _ in found.values()]
    if all(v is None for cells in scores for v in cells):
        held = sorted({t for results, _, _ in found.values() for t in results})
        raise UserError(
            f"no cell of the table can be filled: the folders hold scores of {', '.join(held)}, "
            f"not of {', '.join(c[2] for c in columns) or 'the tasks asked for'}"
        )
    values = [cells + ([None if None in cells else sum(cells) / len(cells)] if mean_column else []) for cells in scores]
    labels = [label for label, _ in found]
    titles = [c[0] for c in columns] + (["Mean"] if mean_column else [])
    metrics = [c[1] for c in columns] + ([""] if mean_column else [])
    markdown = markdown_table(labels, titles, metrics, values)
    by = None
    if "expert" in kinds:
        by, ratios = normalized(scores, labels, [i for i, kind in enumerate(kinds) if kind == "expert"])
        markdown += "\n" + normalized_markdown(labels, [c[0] for c in columns], by, ratios)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "results.md", markdown.encode())
        if by is None:
            ticks = [f"{title}\n{metric}" if metric else title for title, metric in zip(titles, metrics)]
            plot(labels, ticks, values, output_dir / "results.png")
        else:
            ticks = [f"{c[0]}\n÷ {b[0]}" if b else f"{c[0]}\n(no expert above 0)" for c, b in zip(columns, by)]
            ylabel = "% of the best expert on the task"
            plot(labels, ticks + ["Mean"], ratios, output_dir / "results.png", ylabel=ylabel, line=100.0)
    return markdown

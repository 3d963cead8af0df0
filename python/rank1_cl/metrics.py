"""MTIL metrics of an accuracy matrix and the result files (JSON, CSV, heat-map PNG).

a[i][j] is the accuracy on task j's test set after training task i (rows: training steps, columns: tasks).
    Transfer = mean over columns j >= 2 (1-based) of the mean over rows i < j of a[i][j]   (zero-shot on future tasks)
    Avg      = mean of all entries
    Last     = mean of the last row
A matrix with fewer rows than columns (a run stopped early) is summarised over the rows it has.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence

from rank1_kernels.adapters import atomic_write


def _check(matrix: Sequence[Sequence[float]]) -> list:
    rows = [list(map(float, row)) for row in matrix]
    if not rows or not rows[0]:
        raise ValueError("the accuracy matrix is empty; expected rows (after task i) of columns (test set j)")
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ValueError(f"accuracy matrix rows have different lengths {[len(row) for row in rows]}")
    if len(rows) > width:
        raise ValueError(f"accuracy matrix has {len(rows)} rows but {width} columns; expected rows <= columns")
    return rows


def transfer(matrix) -> float | None:
    """Mean over columns j >= 1 (0-based) of mean(a[i][j] for i < j); None for a single-task matrix."""
    rows = _check(matrix)
    column_means = []
    for column in range(1, len(rows[0])):
        above = [rows[row][column] for row in range(min(column, len(rows)))]
        column_means.append(sum(above) / len(above))
    return sum(column_means) / len(column_means) if column_means else None


def average(matrix) -> float:
    rows = _check(matrix)
    return sum(map(sum, rows)) / (len(rows) * len(rows[0]))


def last(matrix) -> float:
    row = _check(matrix)[-1]
    return sum(row) / len(row)


def summarize(matrix) -> dict:
    return {
        "transfer": transfer(matrix),
        "avg": average(matrix),
        "last": last(matrix),
        "complete": len(matrix) == len(matrix[0]),
    }


def matrix_csv(matrix, task_names: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["after_task", *task_names])
    for row_index, row in enumerate(matrix):
        writer.writerow([task_names[row_index], *[f"{value:.4f}" for value in row]])
    return buffer.getvalue()


def format_matrix(matrix, task_names: Sequence[str], title: str = "") -> str:
    """A fixed-width text table in percent, with the metrics under it."""
    width = max(8, *(len(name) + 1 for name in task_names))
    lines = [title] if title else []
    lines.append("after \\ on".ljust(width) + "".join(name[: width - 1].rjust(width) for name in task_names))
    for row_index, row in enumerate(matrix):
        lines.append(task_names[row_index][: width - 1].ljust(width) + "".join(f"{100 * v:{width}.1f}" for v in row))
    summary = summarize(matrix)
    transfer_text = "n/a" if summary["transfer"] is None else f"{100 * summary['transfer']:.1f}"
    lines.append(f"Transfer {transfer_text}   Avg {100 * summary['avg']:.1f}   Last {100 * summary['last']:.1f}")
    return "\n".join(lines)


def _write_text(path: str, text: str) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


def save_heatmap(path: str, matrix, task_names: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.0 + 0.7 * len(task_names), 0.8 + 0.6 * len(matrix)))
    image = axes.imshow([[100 * v for v in row] for row in matrix], vmin=0, vmax=100, cmap="viridis")
    axes.set_xticks(range(len(task_names)), task_names, rotation=45, ha="right")
    axes.set_yticks(range(len(matrix)), task_names[: len(matrix)])
    axes.set_xlabel("evaluated on")
    axes.set_ylabel("after training on")
    for row_index, row in enumerate(matrix):
        for column, value in enumerate(row):
            axes.text(column, row_index, f"{100 * value:.0f}", ha="center", va="center", color="white", fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def write_results(run_dir: str, results: dict, plot: bool = True) -> list:
    """results: {"tasks": [...], "matrices": {"mtil": [[...]], "xtail": [[...]]}, ...}. Writes results.json,
    accuracy_<kind>.csv and accuracy_<kind>.png under run_dir (atomically); returns the paths written."""
    os.makedirs(run_dir, exist_ok=True)
    task_names = results["tasks"]
    results = dict(results, metrics={kind: summarize(m) for kind, m in results["matrices"].items() if m})
    paths = [os.path.join(run_dir, "results.json")]
    _write_text(paths[0], json.dumps(results, indent=2))
    for kind, matrix in results["matrices"].items():
        if not matrix:
            continue
        csv_path = os.path.join(run_dir, f"accuracy_{kind}.csv")
        _write_text(csv_path, matrix_csv(matrix, task_names))
        paths.append(csv_path)
        if plot:
            png_path = os.path.join(run_dir, f"accuracy_{kind}.png")
            summary = results["metrics"][kind]
            transfer_text = "n/a" if summary["transfer"] is None else f"{100 * summary['transfer']:.1f}"
            title = (
                f"{results.get('method', '')} {kind.upper()}: Transfer {transfer_text}  Avg {100 * summary['avg']:.1f}  "
                f"Last {100 * summary['last']:.1f}"
            )
            save_heatmap(png_path, matrix, task_names, title)
            paths.append(png_path)
    return paths

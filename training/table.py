"""``dsmi table``: the figures of evaluation reports side by side (text or Markdown), and their
CMC curves in one plot."""

from __future__ import annotations

import json
from pathlib import Path

from .experiment import FIGURES
from .plots import plot_cmc_curves

__all__ = ["load_figures", "format_table", "plot_runs"]


def load_figures(path: str | Path, protocol: str = "single-shot") -> tuple[str, dict]:
    """A report.json, a repeat summary.json, or a folder holding either -> (name, figures);
    the name is the folder's when a folder is given (runs of one model differ by folder), else
    the model's."""
    path = Path(path)
    folder_name = path.name if path.is_dir() else None
    if path.is_dir():
        for candidate in (path / "summary.json", path / "eval" / "report.json",
                          path / "report.json"):
            if candidate.is_file() and (candidate.name != "summary.json"
                                        or "mean" in json.loads(candidate.read_text())):
                path = candidate
                break
        else:
            raise FileNotFoundError(f"no report.json or repeat summary.json in {path}")
    data = json.loads(path.read_text())
    if "mean" in data:  # dsmi repeat summary
        figures = data["mean"][protocol]
        name = data.get("name") or path.parent.name
    else:
        figures = next(r for r in data["results"] if r["protocol"] == protocol)
        model = data.get("model") or {}
        name = model.get("name") or path.parent.name
    return folder_name or name, figures


def format_table(rows: list[tuple[str, dict]], markdown: bool = False) -> str:
    def cell(fig: dict, key: str) -> str:
        value = f"{100 * fig[key]:.2f}"
        std = fig.get(f"{key}_std")
        return f"{value} ± {100 * std:.2f}" if std else value

    header = ["run", "rank-1", "rank-5", "rank-10", "rank-20", "mAP", "splits x trials"]
    body = [[name, *(cell(fig, k) for k in FIGURES),
             f"{fig.get('splits', 1)} x {fig.get('trials_per_split', fig.get('trials', 1))}"]
            for name, fig in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))
                     for r in [header, *body])


def plot_runs(rows: list[tuple[str, dict]], path: str | Path, title: str | None = None) -> Path:
    """The CMC curves of several runs (``load_figures`` rows) in one PNG."""
    missing = [name for name, fig in rows if "cmc" not in fig]
    if missing:
        raise ValueError(f"no CMC curve in the report of {', '.join(missing)} (reports "
                         f"written before curves were kept): rerun dsmi evaluate / repeat")
    return plot_cmc_curves([(name, fig["cmc"], fig["mAP"]) for name, fig in rows], path,
                           title or f"CMC, {rows[0][1].get('protocol', '')}")

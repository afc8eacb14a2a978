"""A self-contained HTML report of a run: config, accuracy, pictures, probes and a sample table."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from actcap.analysis.figures import make_figures
from actcap.analysis.probes import ProbeResult
from actcap.analysis.run_stats import run_statistics, statistics_html
from actcap.data.samples import SampleRef, is_run, list_samples, run_samples
from actcap.errors import NoActivationsError
from actcap.storage.durable import atomic_write_bytes
from actcap.storage.location import is_url
from actcap.storage.runinfo import open_run

_SCRIPT = """
const rows = () => Array.from(document.querySelectorAll('#samples tbody tr'));
function applyFilter() {
  const text = document.getElementById('filter').value.toLowerCase();
  const grade = document.getElementById('grade').value;
  let shown = 0;
  for (const tr of rows()) {
    const ok = tr.textContent.toLowerCase().includes(text) && (grade === 'all' || tr.dataset.correct === grade);
    tr.style.display = ok ? '' : 'none';
    if (ok) shown++;
  }
  document.getElementById('shown').textContent = shown;
}
function sortBy(col) {
  const tbody = document.querySelector('#samples tbody');
  const th = document.querySelectorAll('#samples th')[col];
  const dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
  document.querySelectorAll('#samples th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = dir;
  const sorted = rows().sort((a, b) => {
    const x = a.children[col].textContent, y = b.children[col].textContent;
    const nx = parseFloat(x), ny = parseFloat(y);
    const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return dir === 'asc' ? c : -c;
  });
  sorted.forEach(tr => tbody.appendChild(tr));
}
document.getElementById('filter').addEventListener('input', applyFilter);
document.getElementById('grade').addEventListener('change', applyFilter);
document.querySelectorAll('#samples th').forEach((th, i) => th.addEventListener('click', () => sortBy(i)));
applyFilter();
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .accuracy { font-size: 2.2em; font-weight: bold; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; } .figs img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.ok { color: #0a7d2c; font-weight: bold; } .bad { color: #b00020; font-weight: bold; } pre { white-space: pre-wrap; margin: 0; }
#samples td:nth-child(2), #samples td:nth-child(3) { max-width: 380px; } .note { color: #666; }
"""


TABLE_ROWS = 2_000
"""Samples listed in the report's table at most (the first ones of the run)."""


def _e(value: Any) -> str:
    """Text for HTML (element content or a quoted attribute): every run value goes through this."""
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str | None:
    """A finite number formatted, or None for anything else (a string, a bool, NaN, a list)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # an int too large for a float raises OverflowError
    except OverflowError:
        return None
    return f"{number:.{digits}f}" if math.isfinite(number) else None


def _count(value: Any) -> str:
    """A count (a non-negative int) as text, or ``unknown`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "unknown"
    return f"{value:,}"


def _brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a value from a file may be huge or deep)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _grade(correct: Any) -> tuple[str, str]:
    """``(data-correct value, cell HTML)`` of a manifest's ``correct`` field."""
    if correct is True:
        return "true", "<span class='ok'>correct</span>"
    if correct is False:
        return "false", "<span class='bad'>wrong</span>"
    if correct is None:
        return "none", "—"
    return "unknown", f"<span class='note'>{_e(correct)}</span>"


def _results_html(results: Any) -> list[str]:
    """Accuracy overall and per category; values that are not numbers show as unknown."""
    if not isinstance(results, dict):
        return [
            f"<p class='note'>results.json is not an object ({_e(type(results).__name__)}); "
            "accuracy unknown.</p>"
        ]
    accuracy = _number(results.get("accuracy"))
    parts = [
        f"<p>Accuracy <span class='accuracy' id='accuracy'>{accuracy or 'unknown'}</span> "
        f"({_e(results.get('n_correct'))}/{_e(results.get('n'))})</p>"
    ]
    if accuracy is None:
        parts.append(
            f"<p class='note'>results.json: accuracy is {_e(_brief(results.get('accuracy')))}, "
            "not a number.</p>"
        )
    per_category = results.get("per_category")
    if isinstance(per_category, dict) and per_category:
        parts.append(
            "<h2>Accuracy by category</h2><table id='categories'><tr><th>category</th>"
            "<th>accuracy</th><th>n</th></tr>"
        )
        for cat, r in per_category.items():
            row = r if isinstance(r, dict) else {}
            parts.append(
                f"<tr><td>{_e(cat or '(none)')}</td><td>{_number(row.get('accuracy')) or 'unknown'}"
                f"</td><td>{_e(row.get('n', ''))}</td></tr>"
            )
        parts.append("</table>")
    return parts


def _read(
    root: str | Path,
) -> tuple[dict[str, Any], Any, list[dict[str, Any]], list[SampleRef] | str]:
    """A run's config, results, manifest records and samples (or why it has none), read once."""
    if is_run(root):
        info = open_run(root)
        config = info.config if isinstance(info.config, dict) else {}
        records = [e.record for e in info.entries]
        try:
            return config, info.results, records, run_samples(info, root)
        except NoActivationsError as e:
            return config, info.results, records, str(e)
    samples = list_samples(root)  # a folder that is no run: without files, nothing to report
    return {}, None, [{"id": s.id} for s in samples], samples


def _figures_html(
    root: str | Path, samples: list[SampleRef] | str, site: str | None, target: str
) -> tuple[list[str], list[ProbeResult], int]:
    """The pictures (embedded), the notes on what is missing, and the probes."""
    parts = ["<h2>Pictures</h2>"]
    if isinstance(samples, str):
        return [*parts, f"<p class='note'>No pictures: {_e(samples)}</p>"], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        figs = make_figures(root, tmp, site, target, samples=samples)
        parts.append("<div class='figs'>")
        for f in figs.figures:
            data = base64.b64encode(f.path.read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{_e(f.title)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{_e(f.title)}</figcaption></figure>"
            )
    parts.append("</div>")
    parts.extend(f"<p class='note'>Not shown: {_e(note)}</p>" for note in figs.notes)
    return parts, figs.probes, figs.skipped_files


def _probes_html(probes: list[ProbeResult], target: str) -> list[str]:
    if not probes:
        return []
    parts = [
        f"<h2>Linear probes for {_e(target)}</h2><table id='probes'><tr><th>site</th>"
        "<th>accuracy</th><th>std</th><th>baseline</th></tr>"
    ]
    for p in probes:
        parts.append(
            f"<tr><td>{_e(p.site)}</td><td>{p.accuracy:.3f}</td><td>{p.std:.3f}</td>"
            f"<td>{p.baseline:.3f}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _samples_html(records: list[dict[str, Any]], max_rows: int) -> list[str]:
    """The sample table: the first ``max_rows`` samples, every value escaped."""
    listed = (
        f"the first {max_rows:,} of {len(records):,} samples listed; "
        if len(records) > max_rows
        else ""
    )
    parts = [
        "<h2>Samples</h2><p><input id='filter' placeholder='filter by text' size='40'> "
        "<select id='grade'><option value='all'>all</option><option value='true'>correct</option>"
        "<option value='false'>incorrect</option></select> "
        f"<span class='note' id='listed'>{listed}</span>showing <span id='shown'></span></p>",
        "<table id='samples'><thead><tr><th>id</th><th>question</th><th>response</th>"
        "<th>reference</th><th>grade</th><th>category</th></tr></thead><tbody>",
    ]
    for r in records[:max_rows]:
        state, grade = _grade(r.get("correct"))
        parts.append(
            f"<tr data-correct='{state}'><td>{_e(r.get('id', ''))}</td>"
            f"<td><pre>{_e(r.get('question', ''))}</pre></td>"
            f"<td><pre>{_e(r.get('response', ''))}</pre></td><td>{_e(r.get('reference', ''))}</td>"
            f"<td>{grade}</td><td>{_e(r.get('category', ''))}</td></tr>"
        )
    parts.append("</tbody></table>")
    return parts


def _nonfinite_html(bad: Any) -> list[str]:
    """The warning for values the storage dtype could not hold; any odd field shows as unknown."""
    if bad is None or bad == {}:
        return []
    if not isinstance(bad, dict):
        return [
            "<p class='note' id='nonfinite'>results.json: nonfinite is not an object; whether "
            "activation values were stored as inf/nan is unknown.</p>"
        ]
    sites = bad.get("sites")
    if isinstance(sites, dict | list) and sites:
        names = ", ".join(str(x) for x in sites)
    else:
        names = "unknown"
    return [
        f"<p class='bad' id='nonfinite'>{_count(bad.get('values'))} activation values were "
        f"stored as inf/nan (the storage dtype cannot hold them; sites: {_e(names)}). "
        "Re-run with --dtype bfloat16.</p>"
    ]


def _worst_site(sites: Any) -> str:
    """``, largest relative difference X at SITE`` over the verified sites, or ``""``."""
    if not isinstance(sites, dict):
        return ""
    rels = [
        (float(d["max_rel"]), str(s))
        for s, d in sites.items()
        if isinstance(d, dict) and _number(d.get("max_rel")) is not None
    ]
    worst = max(rels, default=None)
    return f", largest relative difference {worst[0]:.2e} at {worst[1]}" if worst else ""


def _checks_html(results: Any) -> list[str]:
    """The verification verdict and the values the storage dtype could not hold; red on failure.

    Both come from ``results.json`` (``--verify``, ``actcap verify``; ``nonfinite``). Fields of
    an unexpected type show as unknown.
    """
    if not isinstance(results, dict):
        return []
    parts = _nonfinite_html(results.get("nonfinite"))
    v = results.get("verification")
    if not isinstance(v, dict):
        return [*parts, "<p class='note' id='verification'>Not verified (actcap verify RUN).</p>"]
    tol = _number(v.get("tolerance"), 6)
    passed = v.get("passed")
    head = "passed" if passed is True else "FAILED" if passed is False else "not run"
    checked = _count(v.get("n_checked", 0))
    total = _count(v.get("n_samples")) if "n_samples" in v else "?"
    text = (
        f"Verification {head}: {checked} of {total} samples re-checked alone"
        f"{_worst_site(v.get('sites'))}{f' (tolerance {tol})' if tol else ''}."
    )
    raw = v.get("problems")
    problems: list[Any] = raw if isinstance(raw, list) and passed is False else []
    css = "ok" if passed is True else "bad" if passed is False else "note"
    parts.append(f"<p class='{css}' id='verification'>{_e(text)}</p>")
    parts.extend(f"<p class='bad'>{_e(p)}</p>" for p in problems[:10])
    return parts


def build_report(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    site: str | None = None,
    target: str = "correct",
    max_rows: int = TABLE_ROWS,
) -> Path:
    """Write one self-contained HTML page (images embedded) describing a run.

    Every value that comes from the run (ids, questions, answers, grades, categories, results,
    config, site names) is escaped: the page runs only its own script. Memory stays bounded on
    runs of any size (see :func:`make_figures`); the table lists the first ``max_rows`` samples.
    A run without activations (``--no-capture``) gets its accuracy and table, without pictures.

    Args:
        directory: A run directory (or folder of activation files).
        out: The HTML file to write.
        site: Site for the one-site pictures (middle layer by default).
        target: Probe target.
        max_rows: Samples listed in the table at most.

    Returns:
        The path written.
    """
    root: str | Path = os.fspath(directory) if is_url(directory) else Path(directory)
    name = os.fspath(root).rstrip("/").rsplit("/", 1)[-1]
    config, results, records, samples = _read(root)
    figures, probes, skipped = _figures_html(root, samples, site, target)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>actcap report: {_e(name)}"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>actcap report: {_e(name)}</h1>",
        f"<p>Model <b>{_e(config.get('model', '?'))}</b> on "
        f"<b>{_e(config.get('benchmark', '?'))}</b>, {len(records):,} samples.</p>",
    ]
    if results is not None:
        parts.extend(_results_html(results))
        parts.extend(_checks_html(results))
    found = run_statistics(root)
    if found is not None:
        parts.extend(statistics_html(*found))
    parts.extend(figures)
    parts.extend(_probes_html(probes, target))
    parts.extend(_samples_html(records, max_rows))
    parts.append(
        "<h2>Run configuration</h2><pre id='config'>"
        f"{_e(json.dumps(config, indent=2, ensure_ascii=False, default=str))}</pre>"
    )
    if skipped:
        parts.append(f"<p class='note'>{skipped:,} unreadable file(s) skipped.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    path = Path(out)
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path

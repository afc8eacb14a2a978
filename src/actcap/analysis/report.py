"""A self-contained HTML report of a run: config, accuracy, pictures, probes and a sample table."""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from actcap.analysis.figures import make_figures
from actcap.analysis.sources import list_samples, run_config
from actcap.storage.files import atomic_write_bytes
from actcap.storage.location import is_url

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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def build_report(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    site: str | None = None,
    target: str = "correct",
) -> Path:
    """Write one self-contained HTML page (images embedded) describing a run.

    Args:
        directory: A run directory (or folder of activation files).
        out: The HTML file to write.
        site: Site for the one-site pictures (middle layer by default).
        target: Probe target.

    Returns:
        The path written.
    """
    root: str | Path = os.fspath(directory) if is_url(directory) else Path(directory)
    name = os.fspath(root).rstrip("/").rsplit("/", 1)[-1]
    info = run_config(root) or {"config": {}, "results": None}
    config, results = info["config"], info["results"] or {}
    samples = list_samples(root)
    with tempfile.TemporaryDirectory() as tmp:
        figs = make_figures(root, tmp, site, target)
        images = [(f.title, base64.b64encode(f.path.read_bytes()).decode()) for f in figs.figures]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>actcap report: {_e(name)}</title><style>{_STYLE}</style></head><body>"
    ]
    parts.append(f"<h1>actcap report: {_e(name)}</h1>")
    parts.append(
        f"<p>Model <b>{_e(config.get('model', '?'))}</b> on <b>{_e(config.get('benchmark', '?'))}</b>, {len(samples)} samples.</p>"
    )
    if results:
        parts.append(
            f"<p>Accuracy <span class='accuracy' id='accuracy'>{results.get('accuracy', 0):.3f}</span> ({_e(results.get('n_correct'))}/{_e(results.get('n'))})</p>"
        )
        parts.append(
            "<h2>Accuracy by category</h2><table id='categories'><tr><th>category</th><th>accuracy</th><th>n</th></tr>"
        )
        for cat, r in (results.get("per_category") or {}).items():
            parts.append(
                f"<tr><td>{_e(cat or '(none)')}</td><td>{r['accuracy']:.3f}</td><td>{int(r['n'])}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Pictures</h2><div class='figs'>")
    for title, data in images:
        parts.append(
            f"<figure><img alt='{_e(title)}' src='data:image/png;base64,{data}'><figcaption>{_e(title)}</figcaption></figure>"
        )
    parts.append("</div>")
    for note in figs.notes:
        parts.append(f"<p class='note'>Not shown: {_e(note)}</p>")
    if figs.probes:
        parts.append(
            f"<h2>Linear probes for {_e(target)!s}</h2><table id='probes'><tr><th>site</th><th>accuracy</th><th>std</th><th>baseline</th></tr>"
        )
        for p in figs.probes:
            parts.append(
                f"<tr><td>{_e(p.site)}</td><td>{p.accuracy:.3f}</td><td>{p.std:.3f}</td><td>{p.baseline:.3f}</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        "<h2>Samples</h2><p><input id='filter' placeholder='filter by text' size='40'> "
        "<select id='grade'><option value='all'>all</option><option value='true'>correct</option><option value='false'>incorrect</option></select> "
        "showing <span id='shown'></span></p>"
    )
    parts.append(
        "<table id='samples'><thead><tr><th>id</th><th>question</th><th>response</th><th>reference</th><th>grade</th><th>category</th></tr></thead><tbody>"
    )
    for s in samples:
        r = s.record
        correct = r.get("correct")
        grade = (
            "—"
            if correct is None
            else (
                "<span class='ok'>correct</span>" if correct else "<span class='bad'>wrong</span>"
            )
        )
        parts.append(
            f"<tr data-correct='{str(correct).lower()}'><td>{_e(s.id)}</td><td><pre>{_e(r.get('question', ''))}</pre></td>"
            f"<td><pre>{_e(r.get('response', ''))}</pre></td><td>{_e(r.get('reference', ''))}</td><td>{grade}</td><td>{_e(r.get('category', ''))}</td></tr>"
        )
    parts.append("</tbody></table>")
    parts.append(
        f"<h2>Run configuration</h2><pre id='config'>{_e(json.dumps(config, indent=2, ensure_ascii=False))}</pre>"
    )
    if figs.skipped_files:
        parts.append(f"<p class='note'>{figs.skipped_files} unreadable file(s) skipped.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    path = Path(out)
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path

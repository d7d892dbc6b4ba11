"""The report: ``report.html`` (self-contained: figures embedded, the verdict table first, one
section per claim) and ``summary.md`` (the verdict table), from the experiments' result.json."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Optional

from .io import atomic_write_text, read_json

__all__ = ["write_report", "collect_results", "summary_table"]

_BADGE = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700", "error": "#6e7781"}


def collect_results(out: Path, only: Optional[list[str]] = None) -> list[dict]:
    results = []
    for d in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        if only and d.name not in only:
            continue
        f = d / "result.json"
        if f.exists():
            r = read_json(f)
            r["_dir"] = str(d)
            results.append(r)
        elif (d / "error.txt").exists():
            results.append(dict(experiment=d.name, title=d.name, claim="", verdict="error", paper="",
                                measured=(d / "error.txt").read_text()[-2000:], criterion="", figures=[],
                                _dir=str(d), seconds=None))
    from .registry import all_experiments
    order = {e.id: i for i, e in enumerate(all_experiments())}
    return sorted(results, key=lambda r: order.get(r["experiment"], 999))


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def summary_table(results: list[dict]) -> str:
    lines = ["| exp | claim | verdict | measured | time |", "|---|---|---|---|---:|"]
    for r in results:
        secs = r.get("seconds")
        lines.append(f"| {r['experiment']} | {_short(r.get('claim', ''), 110)} | **{r['verdict']}** | "
                     f"{_short(r.get('measured', ''), 220)} | {'' if secs is None else f'{secs:.0f}s'} |")
    return "\n".join(lines)


def write_report(out: Path | str, results: Optional[list[dict]] = None, title: str = "bnlab report",
                 command: Optional[str] = None) -> tuple[Path, Path]:
    out = Path(out)
    results = collect_results(out) if results is None else results
    stamp = time.strftime("%Y-%m-%d %H:%M")
    profiles = sorted({r.get("profile", "?") for r in results if r.get("profile")})
    sha = next((r.get("git_sha") for r in results if r.get("git_sha")), "unknown")
    head = [f"# {title}", "", f"Generated {stamp}; profile {', '.join(profiles) or '?'}; git {sha}."]
    if command:
        head += ["", f"Command: `{command}`"]
    md = "\n".join(head + ["", summary_table(results), ""])
    md_path = out / "summary.md"
    atomic_write_text(md_path, md)

    e = html.escape
    rows = []
    for r in results:
        color = _BADGE.get(r["verdict"], "#6e7781")
        rows.append(f"<tr><td><a href='#{e(r['experiment'])}'>{e(r['experiment'])}</a></td>"
                    f"<td>{e(r.get('claim', ''))}</td>"
                    f"<td><span class='badge' style='background:{color}'>{e(r['verdict'])}</span></td>"
                    f"<td>{e(_short(r.get('measured', ''), 300))}</td></tr>")
    sections = []
    for r in results:
        color = _BADGE.get(r["verdict"], "#6e7781")
        figs = []
        for name in r.get("figures", []):
            path = Path(r["_dir"]) / name
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                figs.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{data}'/>"
                            f"<figcaption>{e(name)}</figcaption></figure>")
        meta = f"profile {e(str(r.get('profile', '?')))}, {r.get('seeds', '?')} seed(s)"
        if r.get("seconds") is not None:
            meta += f", {r['seconds']:.0f} s"
        sections.append(f"""
<section id="{e(r['experiment'])}">
  <h2>{e(r['experiment'])} — {e(r.get('title', ''))}
      <span class="badge" style="background:{color}">{e(r['verdict'])}</span></h2>
  <p class="meta">{meta}{(' · ' + e(r['source'])) if r.get('source') else ''}</p>
  <dl>
    <dt>Claim</dt><dd>{e(r.get('claim', ''))}</dd>
    <dt>Paper</dt><dd>{e(r.get('paper', ''))}</dd>
    <dt>Measured</dt><dd>{e(r.get('measured', ''))}</dd>
    <dt>Criterion</dt><dd>{e(r.get('criterion', ''))}</dd>
    {f"<dt>Notes</dt><dd>{e(r['notes'])}</dd>" if r.get('notes') else ''}
  </dl>
  {''.join(figs)}
</section>""")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1f2328; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border: 1px solid #d0d7de; padding: 6px; vertical-align: top; }}
.badge {{ color: white; padding: 2px 8px; border-radius: 10px; font-size: 0.8em; white-space: nowrap; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #57606a; font-size: 0.8em; }}
dt {{ font-weight: 600; margin-top: 0.6em; }} .meta {{ color: #57606a; }}
section {{ border-top: 1px solid #d0d7de; margin-top: 2em; }}
</style></head>
<body>
<h1>{e(title)}</h1>
<p class="meta">Generated {stamp}; profile {e(', '.join(profiles) or '?')}; git {e(str(sha))}.
{('Command: <code>' + e(command) + '</code>') if command else ''}</p>
<h2 id="verdicts">Verdicts</h2>
<table><thead><tr><th>exp</th><th>claim</th><th>verdict</th><th>measured</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{''.join(sections)}
</body></html>
"""
    html_path = out / "report.html"
    atomic_write_text(html_path, doc)
    return html_path, md_path

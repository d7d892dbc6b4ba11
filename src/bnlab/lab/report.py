"""The report: ``report.html`` (self-contained, figures embedded) and ``summary.md``, from the
experiments' result.json.

What a researcher reads first: a table of contents, the verdict of every experiment and of every
declared part with its paired difference and 95% interval, and — when this run's profile is not
the committed paper profile — the committed paper-profile verdict beside this one wherever they
differ, with the reason they may. Each section then gives the claim, what the paper reported, how
the CPU-scale design departs from it, every part with its registration status (a mark on any
criterion changed after its results were seen), the checks, the measured numbers and the figures.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
import time
from pathlib import Path
from typing import Optional

from .io import atomic_write_text, read_json

__all__ = ["write_report", "collect_results", "summary_table", "committed_paper_results", "PAPER_RESULTS"]

_BADGE = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700", "diverged": "#8250df",
          "error": "#6e7781"}
# the committed paper-profile run, beside the checkout (docs/results/paper)
PAPER_RESULTS = Path(__file__).resolve().parents[3] / "docs" / "results" / "paper"


def collect_results(out: Path, only: Optional[list[str]] = None) -> list[dict]:
    results = []
    for d in sorted(p for p in Path(out).iterdir() if p.is_dir() and not p.is_symlink()):
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


def committed_paper_results(path: Path = PAPER_RESULTS) -> dict:
    """{experiment id: result.json} of the committed paper-profile run ({} when there is none)."""
    out = {}
    if path.is_dir():
        for d in path.iterdir():
            f = d / "result.json"
            if f.exists():
                try:
                    r = read_json(f)
                except ValueError:
                    continue
                if r.get("profile") == "paper":
                    out[r["experiment"]] = r
    return out


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _differs(r: dict, paper: dict) -> Optional[str]:
    """Why this run's verdict may differ from the committed paper run's, or None when they agree."""
    p = paper.get(r["experiment"])
    if p is None or r.get("profile") == "paper" or p.get("verdict") == r.get("verdict"):
        return None
    return (f"the committed paper-profile run ({p.get('seeds', '?')} seeds, its full budget) says "
            f"“{p['verdict']}”; this {r.get('profile', '?')}-profile run ({r.get('seeds', '?')} seeds, a "
            f"smaller budget) says “{r['verdict']}”: fewer seeds widen every interval and a shorter run can "
            f"change what is measured — the paper profile is the verdict of record")


def summary_table(results: list[dict], paper: Optional[dict] = None) -> str:
    paper = paper or {}
    lines = ["| exp | claim | verdict | parts | time |", "|---|---|---|---|---:|"]
    for r in results:
        secs = r.get("seconds")
        parts = ", ".join(f"{p['id'].split('.', 1)[1]}: {p['verdict']}" for p in r.get("parts", []))
        verdict = f"**{r['verdict']}**"
        if _differs(r, paper):
            verdict += f" (paper profile: {paper[r['experiment']]['verdict']})"
        lines.append(f"| {r['experiment']} | {_short(r.get('claim', ''), 110)} | {verdict} | {parts} | "
                     f"{'' if secs is None else f'{secs:.0f}s'} |")
    return "\n".join(lines)


def _part_rows(r: dict, e) -> str:
    rows = []
    for p in r.get("parts", []):
        reg = p.get("registration") or {}
        mark = ""
        if reg.get("changed_after_results_seen"):
            mark = " <span class='mark' title='criterion changed after its results were seen'>⚑ changed after results were seen</span>"
        elif reg and not reg.get("locked_before_run"):
            mark = " <span class='mark'>not locked before this run</span>"
        color = _BADGE.get(p["verdict"], "#6e7781")
        rows.append(f"<tr><td><code>{e(p['id'])}</code>{mark}</td><td>{e(p.get('claim', ''))}"
                    f"<div class='crit'>{e(p.get('description', ''))}</div></td>"
                    f"<td>{e(p.get('summary', ''))}</td>"
                    f"<td><span class='badge' style='background:{color}'>{e(p['verdict'])}</span></td></tr>")
    if not rows:
        return ""
    return ("<table class='parts'><thead><tr><th>part</th><th>claim and declared test</th>"
            "<th>paired difference [95% interval], effect size</th><th>verdict</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _commits(results: list[dict]) -> str:
    """The commit the results were produced at; when some experiments were re-run at another, the
    most common one and each other experiment's own ("31af640… (E11 at 8304e82…)")."""
    shas = [(r.get("experiment", "?"), r["git_sha"]) for r in results if r.get("git_sha")]
    if not shas:
        return "unknown"
    counts = Counter(sha for _, sha in shas)
    main = max(counts, key=lambda s: (counts[s], s == shas[0][1]))
    others = [f"{exp} at {sha}" for exp, sha in shas if sha != main]
    return main + (f" ({', '.join(others)})" if others else "")


def write_report(out: Path | str, results: Optional[list[dict]] = None, title: str = "bnlab report",
                 command: Optional[str] = None, paper: Optional[dict] = None) -> tuple[Path, Path]:
    out = Path(out)
    results = collect_results(out) if results is None else results
    paper = committed_paper_results() if paper is None else paper
    stamp = time.strftime("%Y-%m-%d %H:%M")
    profiles = sorted({r.get("profile", "?") for r in results if r.get("profile")})
    sha = _commits(results)
    head = [f"# {title}", "", f"Generated {stamp}; profile {', '.join(profiles) or '?'}; git {sha}."]
    if command:
        head += ["", f"Command: `{command}`"]
    flagged = [r for r in results if _differs(r, paper)]
    if flagged:
        head += ["", "Verdicts that differ from the committed paper-profile run (the verdict of record): "
                 + "; ".join(f"{r['experiment']}: {r['verdict']} here, {paper[r['experiment']]['verdict']} there"
                             for r in flagged) + "."]
    md = "\n".join(head + ["", summary_table(results, paper), ""])
    md_path = out / "summary.md"
    atomic_write_text(md_path, md)

    e = html.escape
    toc = "".join(f"<li><a href='#{e(r['experiment'])}'>{e(r['experiment'])} — {e(r.get('title', ''))}</a></li>"
                  for r in results)
    rows = []
    for r in results:
        color = _BADGE.get(r["verdict"], "#6e7781")
        why = _differs(r, paper)
        note = f"<div class='diff'>⚠ {e(why)}</div>" if why else ""
        parts = "<br/>".join(f"{e(p['id'].split('.', 1)[1])}: {e(p['verdict'])} — {e(p.get('summary', ''))}"
                             for p in r.get("parts", []))
        rows.append(f"<tr><td><a href='#{e(r['experiment'])}'>{e(r['experiment'])}</a></td>"
                    f"<td>{e(r.get('claim', ''))}</td>"
                    f"<td><span class='badge' style='background:{color}'>{e(r['verdict'])}</span>{note}</td>"
                    f"<td class='small'>{parts or e(_short(r.get('measured', ''), 400))}</td></tr>")
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
        checks = "".join(f"<li>{'✓' if c['passed'] else '✗ FAILED'} <b>{e(c['name'])}</b>: {e(c['description'])}"
                         f"{(' — ' + e(c['detail'])) if c.get('detail') else ''}</li>" for c in r.get("checks", []))
        why = _differs(r, paper)
        sections.append(f"""
<section id="{e(r['experiment'])}">
  <h2>{e(r['experiment'])} — {e(r.get('title', ''))}
      <span class="badge" style="background:{color}">{e(r['verdict'])}</span></h2>
  <p class="meta">{meta}{(' · ' + e(r['source'])) if r.get('source') else ''}</p>
  {f"<p class='diff'>⚠ {e(why)}</p>" if why else ''}
  <dl>
    <dt>Claim</dt><dd>{e(r.get('claim', ''))}</dd>
    <dt>Paper</dt><dd>{e(r.get('paper', ''))}</dd>
    {f"<dt>Departures from the paper</dt><dd>{e(r['departures'])}</dd>" if r.get('departures') else ''}
    <dt>Verdict parts</dt><dd>{_part_rows(r, e) or e(r.get('criterion', ''))}
      <p class='small'>The experiment's verdict follows from its parts by the rule “{e(r.get('rule', 'all parts'))}”:
      diverged if any part diverged, supported if all are, not supported if any is, else inconclusive.</p></dd>
    {f"<dt>Checks (hold by construction; not evidence)</dt><dd><ul>{checks}</ul></dd>" if checks else ''}
    <dt>Measured</dt><dd>{e(r.get('measured', ''))}</dd>
    {f"<dt>Notes</dt><dd>{e(r['notes'])}</dd>" if r.get('notes') else ''}
  </dl>
  {''.join(figs)}
</section>""")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; padding: 0 1em; color: #1f2328; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border: 1px solid #d0d7de; padding: 6px; vertical-align: top; }}
.badge {{ color: white; padding: 2px 8px; border-radius: 10px; font-size: 0.8em; white-space: nowrap; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #57606a; font-size: 0.8em; }}
dt {{ font-weight: 600; margin-top: 0.8em; }} .meta, .small, .crit {{ color: #57606a; font-size: 0.85em; }}
.diff {{ background: #fff8c5; padding: 4px 8px; border-radius: 6px; font-size: 0.85em; }}
.mark {{ color: #cf222e; font-size: 0.8em; }} section {{ border-top: 1px solid #d0d7de; margin-top: 2em; }}
nav ol {{ columns: 2; }}
</style></head>
<body>
<h1>{e(title)}</h1>
<p class="meta">Generated {stamp}; profile {e(', '.join(profiles) or '?')}; git {e(str(sha))}.
{('Command: <code>' + e(command) + '</code>') if command else ''}</p>
<nav><h2>Contents</h2><ol><li><a href="#verdicts">Verdicts</a></li>{toc}</ol></nav>
<h2 id="verdicts">Verdicts</h2>
<p class="small">Every part compares arms paired by seed: the mean paired difference with its 95% t-interval
(log ratios for ratio statistics) against a minimum effect or margin declared and locked before the run.</p>
<table><thead><tr><th>exp</th><th>claim</th><th>verdict</th><th>parts</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{''.join(sections)}
</body></html>
"""
    html_path = out / "report.html"
    atomic_write_text(html_path, doc)
    return html_path, md_path

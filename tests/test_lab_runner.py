"""The lab's machinery: result files, resume equivalence, atomic writes, typed overrides,
verdict logic both ways, the report."""

import csv
import html.parser
import json
import math

import pytest

from bnlab.errors import UsageError
from bnlab.lab import io as lab_io
from bnlab.lab import verdict as V
from bnlab.lab.config import parse_overrides
from bnlab.lab.registry import all_experiments, get
from bnlab.lab.report import write_report
from bnlab.lab.runner import run_experiment

REQUIRED = {"experiment", "claim", "verdict", "criterion", "paper", "measured", "config", "git_sha",
            "versions", "seconds"}


def test_result_files_are_well_formed(tmp_path):
    result = run_experiment("E1", profile="tiny", out=tmp_path, progress=False, log=lambda m: None)
    d = tmp_path / "E1"
    on_disk = json.loads((d / "result.json").read_text())
    assert REQUIRED <= set(on_disk) and on_disk == json.loads(json.dumps(result))
    assert on_disk["verdict"] in V.VERDICTS
    rows = list(csv.DictReader(open(d / "metrics.csv")))
    assert rows and set(rows[0]) == {"step", "seed", "arm", "metric", "value"}
    assert {r["arm"] for r in rows} == {"bn", "nobn"}
    assert json.loads((d / "config.json").read_text())["steps"] == 60
    for fig in on_disk["figures"]:
        assert (d / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_interrupt_gives_the_same_numbers(tmp_path):
    clean = run_experiment("E1", profile="tiny", out=tmp_path / "clean", progress=False, log=lambda m: None)

    def interrupt(unit, step):
        if unit == "bn" and step == 37:               # after a checkpoint at 25, mid-unit
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment("E1", profile="tiny", out=tmp_path / "cut", progress=False, hooks=[interrupt],
                       log=lambda m: None)
    assert not (tmp_path / "cut" / "E1" / "result.json").exists()
    resumed = run_experiment("E1", profile="tiny", out=tmp_path / "cut", resume=True, progress=False,
                             log=lambda m: None)
    assert resumed["numbers"] == clean["numbers"]
    a = (tmp_path / "clean" / "E1" / "metrics.csv").read_text()
    b = (tmp_path / "cut" / "E1" / "metrics.csv").read_text()
    assert a == b


def test_resume_refuses_a_different_config(tmp_path):
    run_experiment("E1", profile="tiny", out=tmp_path, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="different config"):
        run_experiment("E1", profile="tiny", out=tmp_path, resume=True, overrides=["lr=0.2"],
                       progress=False, log=lambda m: None)


def test_atomic_json_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    lab_io.atomic_write_json(path, {"verdict": "supported"})

    def crash(src, dst):
        raise OSError("killed")
    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError):
        lab_io.atomic_write_json(path, {"verdict": "not supported", "big": list(range(10000))})
    assert json.loads(path.read_text()) == {"verdict": "supported"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_json_writes_nan_as_null(tmp_path):
    lab_io.atomic_write_json(tmp_path / "x.json", {"a": math.nan, "b": [1.0, math.inf]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None]}


def test_typed_overrides():
    e1 = get("E1")
    cfg = e1.config("quick", parse_overrides(["steps=1230", "eval_every=100", "lr=0.05", "widths=784,50,10",
                                              "data.name=idx", "data.path=/tmp/x", "seeds=1"]))
    assert cfg.steps == 1230 and cfg.lr == 0.05 and cfg.widths == (784, 50, 10)
    assert cfg.data.name == "idx" and cfg.data.path == "/tmp/x" and cfg.seeds == 1
    with pytest.raises(ValueError, match="unknown config key"):
        e1.config("quick", {"stepz": "1"})
    with pytest.raises(ValueError, match="expected int"):
        e1.config("quick", {"steps": "many"})
    with pytest.raises(ValueError, match="unknown profile"):
        e1.config("huge")
    assert e1.config("paper").steps == 50_000


def test_registry_discovers_experiment_modules():
    ids = [e.id for e in all_experiments()]
    assert ids[0] == "E1" and len(ids) == len(set(ids))
    for e in all_experiments():
        assert e.claim and e.paper and set(e.profiles) >= {"quick", "tiny"}
    with pytest.raises(UsageError, match="unknown experiment"):
        get("E99")


def test_verdict_refuses_an_unknown_word():
    with pytest.raises(ValueError):
        V.Verdict("E", "c", "p", "m", "crit", "probably")


def test_fmt_reports_mean_and_spread():
    assert V.fmt([1.0, 3.0]) == "2 ± 1.4 (n=2)"
    assert V.fmt([0.5]) == "0.5 (n=1)"
    assert V.fmt([math.nan]) == "non-finite (diverged)"
    assert V.fmt([1.0, math.nan]) == "1 (n=1, 1 non-finite)"


def test_e1_analysis_on_synthetic_metrics(tmp_path):
    """E1's whole analysis (its statistics, parts and rule) says 'supported' for BN-like numbers and
    'not supported' for the reverse."""
    from bnlab.lab.runner import RunContext
    e1 = get("E1")
    cfg = e1.config("tiny", {"seeds": 5})

    def ctx_with(good_arm):
        ctx = RunContext(e1, cfg, tmp_path, resume=False, progress=False, log=lambda m: None)
        bad = "nobn" if good_arm == "bn" else "bn"
        for seed in ctx.seeds:
            for step in (0, 20, 40, 60):
                ctx.record(step, seed, good_arm, "test_acc", 0.9 + step / 1000 + seed / 1000)
                ctx.record(step, seed, bad, "test_acc", 0.5 + step / 1000 + seed / 1000)
                for q, base in (("p15", -1.0), ("p50", 0.0), ("p85", 1.0)):
                    ctx.record(step, seed, good_arm, q, base + 0.001 * step)
                    ctx.record(step, seed, bad, q, base + (0.3 if step % 40 else -0.3))
        return ctx

    e1.figures = lambda cfg, ctx: []                                  # this test is about the verdict
    assert e1.analyze(cfg, ctx_with("bn")).verdict == V.SUPPORTED
    assert e1.analyze(cfg, ctx_with("nobn")).verdict == V.NOT_SUPPORTED
    del e1.figures


def test_report_renders_with_sections_and_embedded_images(tmp_path):
    run_experiment("E1", profile="tiny", out=tmp_path, progress=False, log=lambda m: None)
    (tmp_path / "E9").mkdir()
    (tmp_path / "E9" / "error.txt").write_text("exit code 1\nTraceback ...")
    html_path, md_path = write_report(tmp_path)

    class Parser(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.sections, self.images, self.first_table_before_section = [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table" and self.first_table_before_section is None:
                self.first_table_before_section = not self.sections
            if tag == "section":
                self.sections.append(attrs["id"])
            if tag == "img":
                self.images.append(attrs["src"])

    p = Parser()
    p.feed(html_path.read_text())
    assert p.sections == ["E1", "E9"] and p.first_table_before_section
    assert p.images and all(src.startswith("data:image/png;base64,") for src in p.images)
    md = md_path.read_text()
    assert "| E1 |" in md and "**error**" in md


def test_report_header_names_every_commit_the_results_came_from():
    """Results re-run at another commit (one experiment after a library change) are not reported
    under the first result's commit alone."""
    from bnlab.lab.report import _commits
    same = [dict(experiment=f"E{i}", git_sha="aaa") for i in range(3)]
    assert _commits(same) == "aaa"
    mixed = same + [dict(experiment="E11", git_sha="bbb")]
    assert _commits(mixed) == "aaa (E11 at bbb)"
    assert _commits([dict(experiment="E1")]) == "unknown"

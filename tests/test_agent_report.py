"""`potstill agent eval` writes a PNG of pass@1 with and without the tool (Wilson intervals), and
`potstill report` shows an Agents section for a run directory that holds agent eval results: the
table's numbers are results.json's, the plot is the written PNG, and the page renders in Chromium."""

from __future__ import annotations

import base64
import io
import json
import subprocess

import pytest

from potstill.agent.sandbox import detect_isolation
from tests.agent_fixtures import SCRIPTS, TASKS, ScriptedTeacher, write_tasks
from tests.browser_fixtures import chromium, headless_flags
from tests.report_fixtures import Page, cells_by_key
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory, tiny_tokenizer):
    from potstill.agent.evaluate import AgentEvalConfig, run_agent_eval

    root = tmp_path_factory.mktemp("agent-run")
    teacher = ScriptedTeacher(make_tiny_model(tiny_tokenizer, layers=2, seed=1, init=0.4), tiny_tokenizer, SCRIPTS)
    tasks = [dict(t, split="heldout") for t in TASKS[:2]] + [dict(TASKS[2], split="heldout_template")]
    cfg = AgentEvalConfig(tasks=write_tasks(root / "tasks.jsonl", tasks), teacher=None, students=["x"],
                          max_turns=3, max_new_tokens=96, sandbox_cpu_s=1, sandbox_wall_s=3, scaffold="none",
                          out=str(root / "run" / "eval"), unsafe_sandbox=detect_isolation() == "none")
    result = run_agent_eval(cfg, log=lambda *_: None, models={"scripted <b>": teacher})
    return root / "run", result


@pytest.fixture(scope="module")
def agent_report(agent_run, tmp_path_factory):
    from potstill.evaluate.report import ReportConfig, build_report

    out = tmp_path_factory.mktemp("agent-report")
    build_report([str(agent_run[0])], ReportConfig(out=str(out), examples=0), log=lambda *_: None)
    return out


def test_agent_eval_writes_pass_at_1_png_and_episodes(agent_run):
    from PIL import Image

    run, result = agent_run
    image = Image.open(run / "eval" / "pass_at_1.png")
    assert image.format == "PNG" and image.size[0] > 300 and len(image.convert("RGB").getcolors(1 << 20)) > 20
    episodes = [json.loads(line) for line in (run / "eval" / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 6 and {e["mode"] for e in episodes} == {"tool", "no_tool"}
    assert sum(e["verified"] for e in episodes if e["mode"] == "tool") == result["rows"][0]["tool"]["solved"] == 1


def test_report_has_an_agents_section_with_the_eval_numbers(agent_run, agent_report):
    _, result = agent_run
    html = (agent_report / "report.html").read_text()
    page = Page(html)
    assert '<section id="agents"><h2>Agents</h2>' in html and "scripted &lt;b&gt;" in html and "scripted <b>" not in html
    (table,) = page.table("agent")
    rows = [r for r in table["rows"] if r["attrs"].get("data-model")]
    assert [r["attrs"]["data-model"] for r in rows] == ["scripted <b>"]
    cells = cells_by_key(rows[0])
    row = result["rows"][0]
    assert float(cells["pass@1[tool]"][0]) == row["tool"]["pass@1"] == round(1 / 3, 4)
    assert float(cells["pass@1[no_tool]"][0]) == row["no_tool"]["pass@1"] == 0.0
    assert cells["pass@1[tool]"][1] == "1/3 = 0.333"
    (img,) = [a for a in page.imgs if a.get("id") == "plot-agents"]
    png = base64.b64decode(img["src"].split(",", 1)[1])
    assert png == (agent_report / "agent_pass_at_1.png").read_bytes()
    report = json.loads((agent_report / "report.json").read_text())
    assert report["runs"][0]["agent_eval_rows"][0]["tool"]["solved"] == 1


def test_agent_plot_intervals_are_wilson_for_each_n():
    """The bars' error bars are the rows' own intervals: a rate at n = 3 gets a wider bar than at n = 300."""
    from PIL import Image

    from potstill.agent.evaluate import wilson
    from potstill.evaluate.report_plots import agent_pass_bars

    small, big = wilson(1, 3), wilson(100, 300)
    assert small[0] < 0.1 and small[1] > 0.75 and big[1] - big[0] < 0.11
    row = {"tool": {"n": 3, "pass@1": 1 / 3, "pass@1_ci95": small}, "no_tool": {"n": 300, "pass@1": 1 / 3,
                                                                                "pass@1_ci95": big}}
    png = agent_pass_bars([("m", row)])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert agent_pass_bars([("plain eval row", {"kl": 0.1})]) is None


@pytest.mark.subprocess
def test_agent_report_renders_in_chromium(agent_report, tmp_path):
    exe = chromium()
    url = (agent_report / "report.html").resolve().as_uri()
    flags = headless_flags(tmp_path)
    dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    assert page.table("agent") and any(a.get("id") == "plot-agents" and a["src"].startswith("data:image/png;base64,")
                                       for a in page.imgs)

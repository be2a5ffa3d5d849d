"""docs/rewards.md's worked example runs as written (files, Python, CLI)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from rewards.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "rewards.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks():
    return [(lang, info.strip(), body) for lang, info, body in FENCE.findall(DOC.read_text())]


def test_worked_example_runs(tmp_path):
    blocks = _blocks()
    files = [(info[5:], body) for _, info, body in blocks if info.startswith("file=")]
    runs = [body for lang, info, body in blocks if lang == "python" and info == "run"]
    assert {"my_rewards.py", "stack.yaml", "answers.jsonl"} <= {f for f, _ in files} and runs
    for name, body in files:
        (tmp_path / name).write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for body in runs:
        (tmp_path / "run.py").write_text(body)
        out = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]


def test_documented_cli_command_runs(tmp_path, monkeypatch):
    blocks = _blocks()
    for _, info, body in blocks:
        if info.startswith("file="):
            (tmp_path / info[5:]).write_text(body)
    commands = [ln[2:] for lang, _, body in blocks if lang == "console" for ln in body.splitlines() if ln.startswith("$ vlrl rewards ")]
    assert commands
    monkeypatch.chdir(tmp_path)
    from vlrl.cli import app as vlrl_app  # the command as documented, through the `vlrl` entry point's app

    for cmd in commands:
        argv = shlex.split(cmd)[1:] + ["--workers", "1"]
        res = CliRunner().invoke(vlrl_app, argv)
        assert res.exit_code == 0, res.output
        assert "mentions_units" in res.output and "samples/s" in res.output


def test_cli_list_and_errors(tmp_path):
    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 0 and "math_accuracy" in res.output and "openai_judge" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "x"}\nnot json\n')
    res = CliRunner().invoke(app, ["test", "exact_match", "--data", str(bad), "--workers", "0"])
    assert res.exit_code == 1 and "bad.jsonl line 2" in res.output
    res = CliRunner().invoke(app, ["test", "no_such_reward", "--data", str(bad), "--workers", "0"])
    assert res.exit_code == 1


def test_cli_stack_config_errors_are_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"response": "x", "answer": "x"}\n')
    for name, text, said in [
        ("broken.yaml", "components:\n  a: {fn: format\n", "broken.yaml: line 3: not valid YAML"),
        ("twice.yaml", "components:\n  a: {fn: format}\n  a: {fn: exact_match}\n", "twice.yaml: line 3: not valid YAML (duplicate key 'a', first at line 2"),
        ("broken.json", '{"components": ', "broken.json: line 1: not valid JSON"),
        ("recipe.yaml", "name: r\nstages:\n  rl: {rewards: {}}\n", "recipe.yaml: a recipe, not a stack config"),
    ]:
        (tmp_path / name).write_text(text)
        res = CliRunner().invoke(app, ["test", str(tmp_path / name), "--data", str(data), "--workers", "0"])
        assert res.exit_code == 1 and said in " ".join(res.output.split()), res.output


def test_cli_reads_records_and_reports_failures(tmp_path):
    hostile = Path(__file__).with_name("rewards_hostile_corpus.py")
    data = tmp_path / "d.jsonl"
    rows = [
        '{"id": "r1", "messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "task": "arith", "response": "\\\\boxed{4}"}',
        '{"response": "\\\\boxed{5}", "answer": "4", "group_id": "g"}',
    ]
    data.write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(app, ["test", "math_accuracy", "--data", str(data), "--workers", "0"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["test", f"{hostile}:raises", "--data", str(data), "--workers", "1"])
    assert res.exit_code == 1 and "ValueError" in res.output and "2 with failures" in res.output
    assert "2 of 2 samples had failures (components: raises)" in " ".join(res.output.split())

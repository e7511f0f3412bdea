"""docs/inference.md and docs/python-api.md: every shell command and Python block runs.

The commands run from a scratch directory that links the repository's `examples/` (and
`../shared` when present), as from the repository root. Training is cut to a few steps
(`train.max_steps`, `max_steps=`): the examples must run, not converge.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED
from tuneforge.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def blocks(doc: str, language: str) -> list[str]:
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "examples").symlink_to(ROOT / "examples")
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(repo)
    return repo


def run_command(line: str, monkeypatch) -> str:
    """One documented command, in this process; `printf ... | tuneforge ...` feeds stdin."""
    piped, _, command = line.rpartition(" | ")
    argv = shlex.split(command)
    assert argv[0] == "tuneforge", line
    if argv[1] == "train":
        argv.append(f"train.max_steps={STEPS}")
    if piped:
        text = subprocess.run(["bash", "-c", piped], capture_output=True, text=True, check=True).stdout
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv[1:]) == 0, line
    return out.getvalue()


def run_python(block: str) -> str:
    shortened = re.sub(r"max_steps=\d+", f"max_steps={STEPS}", block)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(shortened, "<doc block>", "exec"), {"__name__": "__doc_example__"})  # noqa: S102  the docs' own code
    return out.getvalue()


def test_every_inference_command_and_example_runs(workspace, monkeypatch):
    commands = [line for block in blocks("inference.md", "bash") for line in block.splitlines() if line.strip()]
    assert len(commands) >= 9
    outputs = {}
    for line in commands:
        if "../shared" in line and not SHARED.is_dir():
            continue  # the JCommonsenseQA example needs the shared data folder
        outputs[line] = run_command(line, monkeypatch)
    # A few training steps do not teach the rule, so answers may be empty: check the layout.
    batch = next(out for line, out in outputs.items() if "--batch-size" in line)
    assert [line for line in batch.splitlines() if line.startswith("### ")] == [
        "### Write five in digits.", "### Write nineteen in digits.", "### Write three hundred in digits."
    ]
    chat = next(out for line, out in outputs.items() if "--show-prompt" in line)
    assert chat.count("[prompt]") == 2 and "### Question:\nWrite one in digits." in chat
    assert (workspace / "compare.md").read_text().startswith("| prompt | runs/quickstart-short | runs/quickstart | reference |")
    tasks = json.loads((workspace / "eval.json").read_text())["tasks"]
    assert [task["type"] for task in tasks] == ["loss", "qa"]
    if SHARED.is_dir():
        jcqa = next(out for line, out in outputs.items() if "jcommonsenseqa" in line)
        assert re.search(r"chance\s+0\.2000", jcqa)
    (python,) = blocks("inference.md", "python")
    printed = run_python(python)
    assert "### Question:\nWrite six in digits." in printed and "| prompt | runs/quickstart-short |" in printed
    assert "'exact_match':" in printed


def test_every_python_api_example_runs(workspace):
    examples = blocks("python-api.md", "python")
    assert len(examples) == 5
    printed = [run_python(block) for block in examples]
    assert re.search(r"eval loss [\d.]+ -> [\d.]+", printed[0])
    assert "{'name': 'lora', 'r': 8}" in printed[1] and "64" in printed[1] and "'max_steps': 3" in printed[1]
    assert "'loss':" in printed[2] and "'perplexity':" in printed[2] and "exports/api-quickstart" in printed[2]
    assert (workspace / "exports" / "api-quickstart" / "model.safetensors").is_file()
    assert (workspace / "runs" / "api-yaml" / "summary.json").is_file()

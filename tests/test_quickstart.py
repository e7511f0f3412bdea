"""The README's quickstart: assets reproducible, and `tuneforge train` learns the rule in time."""

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"


def test_build_assets_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(QUICKSTART / "build_assets.py"), "--out", str(tmp_path)], check=True)
    for relative in ("train.jsonl", "heldout.jsonl", "model/config.json", "model/tokenizer.json", "model/tokenizer_config.json"):
        assert (tmp_path / relative).read_bytes() == (QUICKSTART / relative).read_bytes(), relative


def test_heldout_numbers_are_never_trained_on():
    train = set((QUICKSTART / "train.jsonl").read_text().splitlines())
    heldout = (QUICKSTART / "heldout.jsonl").read_text().splitlines()
    assert heldout and not train & set(heldout)


def test_quickstart_learns_the_rule_within_three_minutes(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli.main", "train", "examples/quickstart.yaml", f"output.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "randomly initialised demonstration model" in out
    assert "model.init=pretrained" in out  # the one-line change to a real model is shown
    match = re.search(r"(\d+) of (\d+) exactly right", out)
    assert match, out[-2000:]
    right, shown = map(int, match.groups())
    assert shown == 12 and right >= 8, out[-2000:]  # chance is ~0: the model learned the rule
    before, after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < 0.2 * before
    assert elapsed < 180, f"quickstart took {elapsed:.0f} s"

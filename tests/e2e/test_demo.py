"""The main demo (`scripts/run_demo.sh` runs examples/demo.py): every mode answers correctly."""

import os
import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_demo_answers_every_question_in_every_mode():
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--n", "2", "--length", "1024"],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^(.+?)\s+(\d+/\d+)\s+[\d.]+s\s+[\d.]+$", proc.stdout, flags=re.M))
    expected = ["published (dense)", "SparseD", "dual KV cache", "dual + threshold 0.9"]
    assert {name.strip(): score for name, score in rows.items()} == dict.fromkeys(expected, "2/2")
    per_step = re.search(r"^dual \+ threshold 0\.9\s+\S+\s+\S+\s+([\d.]+)$", proc.stdout, re.M)
    assert float(per_step.group(1)) > 1.0  # parallel decoding commits several tokens per step

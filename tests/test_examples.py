"""Every script in examples/ runs (as a user would run it) and says what it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECT = {
    "local_ring_chat.py": ["ring of 3 peers up", "> What colour is it?"],
    "openai_client.py": ["model SmolLM2-135M-Instruct.Q4_1", "completion: "],
    "concurrent_requests.py": ["8 request(s):", "batching speedup:"],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example_runs(name, smollm2_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--max-tokens", "4"], capture_output=True, text=True,
                         timeout=240, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    for needle in EXPECT[name]:
        assert needle in out.stdout, f"{needle!r} missing\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr

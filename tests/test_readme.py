"""The README's example runs, and CI calls the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


PAGES = ["README.md", "docs/index.md", "docs/geometry.md", "docs/training.md", "docs/evaluation.md"]


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks, f"{page} has no python example"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, page, "exec"), namespace)


def test_ci_runs_the_quick_start_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)[0].strip().splitlines()
    demo, tests = commands[0], commands[-1]
    assert demo.startswith("pip install -e") and "examples/pixcon/train.py" in demo
    test_command = tests.split("&&", 1)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(test_command)}$", ci, re.M), f"CI must run {test_command!r}"
    assert (ROOT / "examples" / "pixcon" / "train.py").exists()

"""Run every ```python block of docs/methods/*.md and check the loss it computes.

The blocks of one page run in order in one namespace (a later block may continue an earlier one);
each page starts from a fresh namespace with ``torch.manual_seed(0)`` and one thread. Every block
must bind ``loss`` (a scalar tensor) and leave a finite value with a gradient history.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
PAGES = sorted(DOCS.glob("*.md"))
METHOD_PAGES = ("densecl.md", "densesiam.md", "lcloss.md", "pixcon.md", "pixpro.md")


def python_blocks(page: Path) -> list[str]:
    """The bodies of the ```python fenced blocks of ``page``, in order."""
    return FENCE.findall(page.read_text(encoding="utf-8"))


def test_every_method_page_has_a_snippet() -> None:
    names = {p.name for p in PAGES}
    for name in METHOD_PAGES:
        assert name in names, f"docs/methods/{name} is missing"
        assert python_blocks(DOCS / name), f"docs/methods/{name} has no ```python block"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.stem)
def test_snippets_run_and_give_a_finite_loss(page: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        namespace: dict[str, object] = {"__name__": f"docs_methods_{page.stem}"}
        for i, block in enumerate(python_blocks(page)):
            namespace.pop("loss", None)
            exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
            loss = namespace.get("loss")
            assert isinstance(loss, torch.Tensor), f"{page.name} block {i} does not bind a tensor `loss`"
            assert loss.dim() == 0, f"{page.name} block {i}: loss has shape {tuple(loss.shape)}"
            assert torch.isfinite(loss), f"{page.name} block {i}: loss is {loss.item()}"
            assert loss.grad_fn is not None, f"{page.name} block {i}: loss has no gradient history"
    finally:
        torch.set_num_threads(threads)

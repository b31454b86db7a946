"""Every hook is documented and exercised by a test (datasette's rule)."""

import inspect
from pathlib import Path

import pytest

from damselfly import hookspecs

HOOKS = [name for name, fn in vars(hookspecs).items() if name.startswith("damselfly_") and callable(fn)]
TESTS = "\n".join(p.read_text() for p in Path(__file__).parent.rglob("*.py"))


def test_there_are_hooks():
    assert len(HOOKS) >= 7


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and len(doc) > 20, f"{hook} needs a docstring that says when it is called"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_tested(hook):
    uses = TESTS.count(hook)
    assert uses >= 1, f"no test mentions {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_on_the_plugins_page(hook):
    page = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    assert f"`{hook}`" in page

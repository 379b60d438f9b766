"""The backend-author guide's example backend, taken from the docs page itself, passes the whole
contract suite in both modes: a backend written to the documented sync hooks gets the async
API for free."""

from __future__ import annotations

import re
import types
import uuid
from pathlib import Path

import pytest

from coordlock.backends import register_backend
from coordlock.testing.contract import CoordinatorContract

PAGE = Path(__file__).resolve().parents[1] / "docs" / "backend-authors.md"


def _example_module() -> types.ModuleType:
    text = PAGE.read_text()
    section = text.split("## A complete backend", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the guide lost its example backend"
    module = types.ModuleType("backend_author_example")
    exec(compile(code.group(1), str(PAGE), "exec"), module.__dict__)
    return module


example = _example_module()
register_backend("dict", example.DictCoordinator.from_url)


def test_the_example_is_a_new_style_backend() -> None:
    # it overrides no async hook: async comes from the base class
    assert not any(name.startswith("_async_") for name in vars(example.DictCoordinator))


class TestDictContract(CoordinatorContract):
    single_process = True

    @pytest.fixture
    def backend_url(self) -> str:
        return f"dict://t{uuid.uuid4().hex}"

"""A BaseModelDeployment builder for the rendering tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from loraplex.operator.bmd import BaseModelDeployment


def _make_bmd(**spec: Any) -> BaseModelDeployment:
    body = {
        "metadata": {"name": "gemma", "namespace": "llm", "uid": "uid-1", "generation": 3},
        "spec": {"model": {"id": "google/gemma-2-2b-it"}, **spec},
    }
    return BaseModelDeployment.from_body(body)


@pytest.fixture
def make_bmd() -> Callable[..., BaseModelDeployment]:
    """`make_bmd(**spec)`: a BMD `gemma` in namespace `llm` with the given spec fields."""
    return _make_bmd


@pytest.fixture
def bmd() -> BaseModelDeployment:
    return _make_bmd()

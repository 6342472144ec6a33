"""The evaluation tests run torch on one thread: tiny models on a shared 2-core machine are dominated by
thread hand-offs, and one thread keeps CPU use modest. Restored after each module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shoe_lora_pipeline_tests.support.training import one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield

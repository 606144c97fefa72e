"""The CLI and benchmarks ask for huge pages without overriding a user's choice."""

from __future__ import annotations

import pytest

from graphs.hugepages import VARIABLE, enable_transparent_hugepages


def test_sets_the_variable_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VARIABLE, raising=False)
    assert enable_transparent_hugepages() is True
    import os

    assert os.environ[VARIABLE] == "1"


def test_keeps_the_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "0")
    assert enable_transparent_hugepages() is False
    import os

    assert os.environ[VARIABLE] == "0"

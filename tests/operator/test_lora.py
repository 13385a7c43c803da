"""`spec_of`: an adapter's spec validated once per body snapshot."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from loraplex.operator import lora


def body(uri: str = "hf://o/sql", **spec: object) -> dict:
    return {
        "metadata": {"name": "sql"},
        "spec": {"baseModel": {"name": "gemma"}, "source": {"uri": uri}, **spec},
    }


def test_a_spec_mapping_is_validated_once_and_a_new_snapshot_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    validate = lora.LoraAdapterSpec.model_validate

    def counting(raw: object) -> lora.LoraAdapterSpec:
        calls.append(raw)
        return validate(raw)

    monkeypatch.setattr(lora.LoraAdapterSpec, "model_validate", counting)
    first = body()
    assert lora.spec_of(first) is lora.spec_of({**first})  # the same spec mapping: one validation
    assert len(calls) == 1
    changed = body(uri="hf://o/other")  # what a watch event brings: a new snapshot
    assert lora.spec_of(changed).source.uri == "hf://o/other"
    assert len(calls) == 2


def test_an_invalid_spec_raises_every_time() -> None:
    broken = body(servedName="has/slash")
    for _ in range(2):
        with pytest.raises(ValidationError):
            lora.spec_of(broken)


def test_the_memo_starts_over_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora, "_PARSED_MAX", 3)
    monkeypatch.setattr(lora, "_PARSED", {})
    bodies = [body(uri=f"hf://o/a{i}") for i in range(5)]
    assert [lora.spec_of(b).source.uri for b in bodies] == [f"hf://o/a{i}" for i in range(5)]
    assert len(lora._PARSED) <= 3

"""Status conditions keyed by type: build, merge (keeping transition times), look up."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime

from loraplex.operator.common import Condition, ConditionStatus


def timestamp(unix_s: float) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def condition(
    type_: str, ok: bool, reason: str, message: str = "", generation: int | None = None
) -> Condition:
    return Condition(
        type=type_,
        status=ConditionStatus.TRUE if ok else ConditionStatus.FALSE,
        reason=reason,
        message=message,
        observed_generation=generation,
    )


def merge_conditions(
    old: Sequence[Condition], new: Sequence[Condition], now: str, owned: Collection[str] = ()
) -> list[Condition]:
    """`new` replaces conditions of the same type; a transition time moves only when the status
    does. Types in `owned` but not in `new` are dropped (the writer no longer asserts them);
    conditions other writers own are kept as they are."""
    previous = {item.type: item for item in old}
    fresh = {item.type: item for item in new}
    merged = [item for item in old if item.type not in fresh and item.type not in owned]
    for item in new:
        before = previous.get(item.type)
        keep_time = before is not None and before.status == item.status and before.last_transition_time
        merged.append(
            item.model_copy(
                update={"last_transition_time": before.last_transition_time if keep_time else now}
            )
        )
    return sorted(merged, key=lambda item: item.type)


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((item for item in conditions if item.type == type_), None)

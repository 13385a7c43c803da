"""AdapterListing: revisions for `GET /v1/adapters?since=` (pure; the route is tested over HTTP
in tests/server/http/test_http_admin.py)."""

from __future__ import annotations

import pytest

from loraplex.server.routes.listing import MAX_REMOVED, AdapterListing, Cursor


def report(name: str, state: str = "ready", tokens: int = 0) -> dict:
    return {"name": name, "state": state, "generated_tokens": tokens}


def cursor(listing: AdapterListing) -> Cursor:
    return Cursor(listing.instance, listing.revision)


def test_only_what_changed_since_and_the_removals() -> None:
    listing = AdapterListing()
    first = listing.answer([report("a"), report("b", "loading"), report("c")], None)
    assert first.full and [r["name"] for r in first.data] == ["a", "b", "c"] and first.revision == 3
    since = cursor(listing)
    nothing = listing.answer([report("a"), report("b", "loading"), report("c")], since)
    assert (nothing.full, nothing.data, nothing.removed, nothing.revision) == (False, [], [], 3)
    moved = listing.answer([report("a", tokens=5), report("b"), report("d")], since)
    assert [r["name"] for r in moved.data] == ["a", "b", "d"] and moved.removed == ["c"]
    assert moved.data[0]["generated_tokens"] == 5  # any field of the report counts
    later = listing.answer([report("a", tokens=5), report("b"), report("d")], cursor(listing))
    assert later.data == [] and later.removed == []


def test_a_name_back_after_its_removal_is_a_change_not_a_removal() -> None:
    listing = AdapterListing()
    listing.answer([report("a")], None)
    since = cursor(listing)
    listing.answer([], None)
    back = listing.answer([report("a")], since)
    assert [r["name"] for r in back.data] == ["a"] and back.removed == []


@pytest.mark.parametrize("case", ["other instance", "ahead", "removals forgotten"])
def test_an_answer_it_cannot_give_is_the_full_list(case: str) -> None:
    listing = AdapterListing()
    listing.answer([report("a")], None)
    since = cursor(listing)
    if case == "other instance":  # the server restarted: its revisions start over
        since = Cursor("another", since.revision)
    elif case == "ahead":
        since = Cursor(listing.instance, listing.revision + 1)
    else:
        names = [f"x{i}" for i in range(MAX_REMOVED + 2)]
        listing.answer([report(n) for n in names], None)
        listing.answer([], None)  # more removals than remembered
    answer = listing.answer([report("a")], since)
    assert answer.full and [r["name"] for r in answer.data] == ["a"] and answer.removed == []


@pytest.mark.parametrize("text", ["", "7", "abc:", ":3", "abc:-1", "abc:x"])
def test_a_cursor_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Cursor.parse(text)


def test_cursor_round_trip() -> None:
    assert Cursor.parse("3f2a:17") == Cursor("3f2a", 17)

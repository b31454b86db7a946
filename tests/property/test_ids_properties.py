"""Properties of task-id canonicalisation (core/ids.py): filtering is idempotent, drops
exactly the filtered keys, does not care about the order of distinct keys, and a task id
does not change with the values of filtered parameters."""

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from damselfly.core import ids
from damselfly.core.errors import InvalidArgument

pytestmark = pytest.mark.timeout(60)

FILTERED = ("X-Amz-Signature", "X-Amz-Date", "Expires")
keys = st.one_of(st.sampled_from(FILTERED), st.text("abcdefgXYZ-_.~%+ ", min_size=1, max_size=6))
values = st.text(max_size=12).map(lambda v: v.replace("&", "").replace("#", "").replace(";", ""))
hosts = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?(\.[a-z]{2,4})?(:[0-9]{1,5})?", fullmatch=True)
paths = st.from_regex(r"(/[A-Za-z0-9._~%-]{0,8}){0,4}", fullmatch=True)


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    pairs = draw(st.lists(st.tuples(keys, values), max_size=6))
    query = "&".join(f"{k}={v}" for k, v in pairs)
    scheme = draw(st.sampled_from(["http", "https", "HTTPS", "s3"]))
    url = f"{scheme}://{draw(hosts)}{draw(paths)}" + (f"?{query}" if query else "")
    return url, pairs


@settings(max_examples=80, deadline=None)
@given(urls())
def test_filtering_a_filtered_url_changes_nothing(case: tuple[str, list[tuple[str, str]]]) -> None:
    once = ids.filter_query_params(case[0], FILTERED)
    assert ids.filter_query_params(once, FILTERED) == once


@settings(max_examples=80, deadline=None)
@given(urls())
def test_no_filtered_key_survives_filtering(case: tuple[str, list[tuple[str, str]]]) -> None:
    filtered = ids.filter_query_params(case[0], FILTERED)
    query = filtered.partition("?")[2]
    assert not {seg.partition("=")[0] for seg in query.split("&")} & set(FILTERED)


@settings(max_examples=80, deadline=None)
@given(urls(), st.randoms(use_true_random=False))
def test_the_order_of_distinct_query_keys_does_not_change_the_task_id(
    case: tuple[str, list[tuple[str, str]]], rnd: random.Random
) -> None:
    url, pairs = case
    assume(pairs and len({k for k, _ in pairs}) == len(pairs))
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    other = url.partition("?")[0] + "?" + "&".join(f"{k}={v}" for k, v in shuffled)
    assert ids.task_id(url, filtered_query_params=FILTERED) == ids.task_id(other, filtered_query_params=FILTERED)


@settings(max_examples=80, deadline=None)
@given(urls(), values)
def test_the_values_of_filtered_parameters_do_not_change_the_task_id(
    case: tuple[str, list[tuple[str, str]]], signature: str
) -> None:
    url = case[0]
    signed = url + ("&" if "?" in url else "?") + f"X-Amz-Signature={signature}"
    assert ids.task_id(signed, filtered_query_params=FILTERED) == ids.task_id(url, filtered_query_params=FILTERED)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_string_is_filtered_or_refused_with_invalid_argument(url: str) -> None:
    try:
        task = ids.task_id(url, filtered_query_params=FILTERED)
    except InvalidArgument:
        return
    assert ids.is_task_id(task)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=130), st.from_regex(r"[0-9a-f]{64}\s?", fullmatch=True)))
def test_a_task_id_is_exactly_64_or_128_lowercase_hex_digits(value: str) -> None:
    expected = len(value) in (64, 128) and all(c in "0123456789abcdef" for c in value)
    assert ids.is_task_id(value) == expected


def test_a_task_id_with_a_trailing_newline_is_no_task_id() -> None:
    """The pattern ended in "$", which matches before a final newline."""
    assert not ids.is_task_id("a" * 64 + "\n")

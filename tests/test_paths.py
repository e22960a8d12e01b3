"""paths.normalise and split_target as tables: the one path the policy decides on."""

from __future__ import annotations

import pytest

from proxy.errors import BadPath
from proxy.paths import normalise, split_target

NORMALISED = [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/a//b", "/a/b"),  # empty segments merged
    ("///", "/"),
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/../a", "/a"),  # cannot climb above the root
    ("/a/..", "/"),
    ("/a/b/..", "/a/"),  # a dot segment at the end leaves the trailing slash
    ("/a/b/.", "/a/b/"),
    ("/a/b/", "/a/b/"),
    ("/%61%62c", "/abc"),  # unreserved characters decoded
    ("/%7e%2D%5f", "/~-_"),
    ("/%2e%2e/a", "/a"),  # encoded dots are dots: resolved like raw ones
    ("/a/%2E/b", "/a/b"),
    ("/a/%2e%2E/b", "/b"),
    ("/%c3%a9", "/%C3%A9"),  # other escapes kept, upper-cased
    ("/a%20b", "/a%20b"),
    ("/%3a", "/%3A"),
    ("/a%25", "/a%25"),  # a lone encoded '%' is not double encoding
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),  # sub-delims, ':' and '@' as they are
    ("/API/Projects", "/API/Projects"),  # case is kept: the policy matches it
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_normalise(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


REFUSED = [
    ("a/b", "must start with '/'"),
    ("", "must start with '/'"),
    ("/a%2fb", "encoded '/'"),
    ("/a%2Fb", "encoded '/'"),
    ("/a%5cb", "encoded '\\'"),
    ("/a\\b", "'\\' is not allowed"),
    ("/a%23b", "encoded '#'"),
    ("/a%00b", "encoded NUL"),
    ("/a%0ab", "encoded control characters"),
    ("/a%7F", "encoded control characters"),
    ("/a%252f", "double percent-encoding"),
    ("/a%2525", "double percent-encoding"),
    ("/a%25%32%66", "double percent-encoding"),  # the digits encoded too: still %252f
    ("/a%25%35%43", "double percent-encoding"),
    ("/a%25%3", "malformed percent-escape"),
    ("/a%2", "malformed percent-escape at offset 2"),
    ("/a%zz", "malformed percent-escape"),
    ("/a b", "character ' ' is not allowed"),
    ('/a"b', "character '\"' is not allowed"),
    ("/a<b", "character '<' is not allowed"),
    ("/é", "character 'é' is not allowed"),
    ("/a;b", "';' path parameters"),
    ("/a%3bb", "encoded ';'"),
    ("/%C0%AF", "not UTF-8"),  # overlong '/'
    ("/%E0%80%AE%E0%80%AE/a", "not UTF-8"),  # overlong '.'
    ("/a%C3", "not UTF-8"),  # a lead byte alone
    ("/a%80", "not UTF-8"),  # a continuation byte alone
    ("/a%ED%A0%80", "not UTF-8"),  # a surrogate
    ("/a%F4%90%80%80", "not UTF-8"),  # past U+10FFFF
]


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_normalise_refuses(raw: str, why: str) -> None:
    with pytest.raises(BadPath) as exc:
        normalise(raw)
    assert why in str(exc.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("/a;b", "/a;b"), ("/a%3bb", "/a%3Bb"), ("/a;b/../c", "/c")],
)
def test_semicolons_when_allowed(raw: str, expected: str) -> None:
    assert normalise(raw, reject_semicolons=False) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a", ("/a", "")),
        ("/a?x=1", ("/a", "x=1")),
        ("/a?x=1?y", ("/a", "x=1?y")),
        ("/a?", ("/a", "")),
        ("/a%3Fb?c", ("/a%3Fb", "c")),
    ],
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize("target", ["/a#f", "/a?x#f", "#"])
def test_split_target_refuses_fragments(target: str) -> None:
    with pytest.raises(BadPath, match="fragment"):
        split_target(target)

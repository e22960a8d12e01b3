"""Policy compilation and matching, table-driven."""

from __future__ import annotations

import pytest
from conftest import ROOT

from proxy.errors import ConfigErrors
from proxy.policy import Access, compile_text, load

POLICY = load(ROOT / "config" / "policy.yaml")


@pytest.mark.parametrize(
    ("method", "path", "route", "access", "scopes"),
    [
        ("GET", "/api/projects/1/session_recordings/demo-1/snapshots", "recording",
         Access.PROTECTED, ("recording:1/demo-1", "project:1")),
        ("GET", "/api/projects/1/session_recordings/demo-1", "recording", Access.PROTECTED,
         ("recording:1/demo-1", "project:1")),
        ("DELETE", "/api/projects/7/session_recordings/abc/", "recording", Access.PROTECTED,
         ("recording:7/abc", "project:7")),
        ("GET", "/api/projects/1/session_recordings/", "recording-list", Access.PROTECTED,
         ("project:1",)),
        ("GET", "/api/projects/1/session_recordings", "recording-list", Access.PROTECTED,
         ("project:1",)),
        ("GET", "/API/PROJECTS/1/SESSION_RECORDINGS/x", "recording", Access.PROTECTED,
         ("recording:1/x", "project:1")),
        ("POST", "/api/projects/1/session_recordings/demo-1/sharing", "recording-share",
         Access.BLOCKED, ()),
        ("PATCH", "/api/projects/1/session_recordings/demo-1/sharing/x", "recording-share",
         Access.BLOCKED, ()),
        ("GET", "/static/rrweb-player/index.js", "static", Access.PUBLIC, ()),
        ("HEAD", "/static/a.css", "static", Access.PUBLIC, ()),
        ("POST", "/static/a.css", "_default", Access.IDENTITY, ()),
        ("GET", "/staticfoo", "_default", Access.IDENTITY, ()),
        ("GET", "/healthz", "health", Access.PUBLIC, ()),
        ("GET", "/replay/demo-1", "_default", Access.IDENTITY, ()),
        ("GET", "/api/projects/1", "_default", Access.IDENTITY, ()),
    ],
)  # fmt: skip
def test_match(method: str, path: str, route: str, access: Access, scopes: tuple[str, ...]) -> None:
    m = POLICY.match(method, path)
    assert (m.route, m.access, m.scopes) == (route, access, scopes)


def test_hierarchy_is_transitive() -> None:
    p = compile_text(
        """
routes:
  - {id: r, path: "/o/{org}/p/{project}/r/{rec}", scope: "rec:{org}/{project}/{rec}"}
hierarchy:
  - {scope: "rec:{org}/{project}/{rec}", covered_by: ["project:{org}/{project}"]}
  - {scope: "project:{org}/{project}", covered_by: ["org:{org}", "all"]}
""",
        "t.yaml",
    )
    assert p.match("GET", "/o/a/p/b/r/c").scopes == (
        "rec:a/b/c", "project:a/b", "org:a", "all",
    )  # fmt: skip


def test_version_is_the_content_hash() -> None:
    text = (ROOT / "config" / "policy.yaml").read_text()
    assert compile_text(text, "a").version == POLICY.version
    assert compile_text(text + "\n# changed\n", "a").version != POLICY.version


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("routes:\n  - id: a\n    path: /x/{p}\n    scope: 'r:{q}'\n",
         "t.yaml:4: routes[0].scope: unknown parameter {q}"),
        ("routes:\n  - id: a\n    path: /x\n", "t.yaml:2: routes[0].scope: is required"),
        ("routes:\n  - id: a\n    path: x\n    access: public\n",
         "t.yaml:3: routes[0].path: is required and must start with '/'"),
        ("routes:\n  - id: a\n    path: /x\n    access: open\n",
         "t.yaml:4: routes[0].access: must be one of"),
        ("routes:\n  - {id: a, path: /x, access: public}\n  - {id: a, path: /y, access: public}\n",
         "t.yaml:3: routes[1].id: duplicate route id 'a'"),
        ("routes:\n  - id: a\n    path: /x/a{p}\n    access: public\n",
         "t.yaml:3: routes[0].path: a parameter must fill a whole segment"),
        ("routes:\n  - id: a\n    path: /x\n    access: public\n    colour: red\n",
         "t.yaml:5: routes[0].colour: unknown field"),
        ("routes:\n  - id: a\n    path: /x\n    access: public\n    methods: [G ET]\n",
         "t.yaml:5: routes[0].methods: invalid method"),
        ("default: protected\nroutes: []\n", "t.yaml:1: default: cannot be 'protected'"),
        ("routes: []\nhierarchy:\n  - scope: 'r:{a}'\n    covered_by: ['p:{b}']\n",
         "t.yaml:4: hierarchy[0].covered_by: unknown parameter {b}"),
        ("routes: [\n", "t.yaml:2: invalid YAML"),
        ("nope: 1\n", "t.yaml:1: nope: unknown field"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as exc:
        compile_text(text, "t.yaml")
    assert message in str(exc.value)

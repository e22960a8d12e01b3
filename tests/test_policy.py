"""Policy compilation and matching, table-driven."""

from __future__ import annotations

import pytest
from conftest import ROOT

from proxy.errors import ConfigErrors
from proxy.policy import Access, Approval, Entitlement, Policy, format_duration
from proxy.policyfile import compile_text, load

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
        ("GET", "/api/projects/1/session_recordings/", "recording-list", Access.IDENTITY, ()),
        ("GET", "/api/projects/1/session_recordings", "recording-list", Access.IDENTITY, ()),
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
        ("GET", "/replay/demo-1", "player", Access.PROTECTED, ("recording:1/demo-1", "project:1")),
        ("POST", "/replay/demo-1", "_default", Access.IDENTITY, ()),
        ("GET", "/replay/demo-1/x", "_default", Access.IDENTITY, ()),
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


# --- entitlements -------------------------------------------------------------------------

RULES = compile_text(
    """
routes: []
entitlements:
  - id: p1-carol
    scopes: ["recording:1/{recording}"]
    who: {users: [carol]}
    durations: {default: 1h}
    approval: {mode: auto}
  - id: support
    scopes: ["recording:{project}/{recording}", "project:{project}"]
    who: {groups: [support, eng], users: [dave]}
    durations: {offered: [15m, 1h, 4h], default: 1h, max: 4h}
    approval: {mode: approvers, count: 2, approvers: {groups: [leads], users: [erin, frank]}}
  - id: anyone
    scopes: ["recording:{project}/{recording}"]
    who: any
    durations: {offered: [5m], default: 5m}
    reason: optional
    approval: {mode: approvers, approvers: {users: [zed]}}
""",
    "rules.yaml",
)


@pytest.mark.parametrize(
    ("scope", "user", "groups", "expected"),
    [
        # Literal-restricted template: project 1 only, and only for carol.
        ("recording:1/a", "carol", [], "p1-carol"),
        ("recording:2/a", "carol", [], "anyone"),
        # First admitted rule wins: carol, also in eng, gets p1-carol rather than support.
        ("recording:1/a", "carol", ["eng"], "p1-carol"),
        ("recording:1/a", "bob", ["eng"], "support"),  # by group
        ("recording:1/a", "dave", [], "support"),  # by user
        ("recording:1/a", "bob", ["sales"], "anyone"),  # who: any
        ("recording:1/a", "bob", [], "anyone"),
        ("project:1", "bob", ["support"], "support"),
        ("project:1", "bob", [], None),  # `anyone` does not cover projects
        ("project:1", "dave", ["sales"], "support"),
        # A parameter takes one value without '/', never an empty one.
        ("project:1/x", "bob", ["support"], None),
        ("recording:1/a/b", "bob", ["eng"], None),
        ("recording:1/", "bob", ["eng"], None),
        # Literals match exactly and in full.
        ("Recording:1/a", "bob", ["eng"], None),
        ("xrecording:1/a", "bob", ["eng"], None),
        # Nobody signed in: no rule admits, `who: any` included.
        ("recording:1/a", "", ["eng"], None),
    ],
)
def test_entitlement_for(scope: str, user: str, groups: list[str], expected: str | None) -> None:
    ent = RULES.entitlement_for(scope, user, iter(groups))  # any iterable, even one-shot
    assert (ent.id if ent else None) == expected


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("recording:1/a", ("p1-carol", "support", "anyone")),
        ("recording:2/a", ("support", "anyone")),
        ("project:1", ("support",)),
        ("org:1", ()),
    ],
)
def test_entitlements_for_scope(scope: str, expected: tuple[str, ...]) -> None:
    assert tuple(e.id for e in RULES.entitlements_for_scope(scope)) == expected


@pytest.mark.parametrize(
    ("rule", "user", "groups", "expected"),
    [
        ("support", "erin", [], True),  # a named approver
        ("support", "zoe", ["leads"], True),  # by group
        ("support", "zoe", ["eng", "leads"], True),
        ("support", "zoe", ["eng"], False),  # may request, may not approve
        ("support", "dave", [], False),
        ("support", "", ["leads"], False),  # nobody signed in
        ("anyone", "erin", ["leads"], False),  # auto approval has no approvers
        ("p1-carol", "carol", [], False),
    ],
)
def test_may_approve(rule: str, user: str, groups: list[str], expected: bool) -> None:
    ent = RULES.entitlement(rule)
    assert ent is not None
    assert ent.may_approve(user, groups) is expected


def test_admits_and_covers() -> None:
    ent = RULES.entitlement("support")
    assert ent is not None
    assert ent.admits("bob", {"eng"}) and ent.admits("dave", ())
    assert not ent.admits("bob", ["Eng"])  # group names are exact
    assert ent.covers("project:7") and ent.covers("recording:7/x")
    assert not ent.covers("project:")
    assert RULES.entitlement("nope") is None


def test_compiled_fields_and_defaults() -> None:
    ent = RULES.entitlement("support")
    assert ent == Entitlement(
        id="support",
        description="",
        scopes=("recording:{project}/{recording}", "project:{project}"),
        any_user=False,
        groups=frozenset({"support", "eng"}),
        users=frozenset({"dave"}),
        durations=(900.0, 3600.0, 14400.0),
        default_duration=3600.0,
        max_duration=14400.0,
        reason_required=True,
        ticket_pattern=None,
        pending_ttl=3600.0,
        approval=Approval("approvers", 2, frozenset({"leads"}), frozenset({"erin", "frank"})),
        extend_requires_approval=True,  # the default for mode approvers
        break_glass=False,
    )
    anyone = RULES.entitlement("anyone")
    assert anyone is not None
    assert anyone.any_user and not anyone.reason_required
    assert anyone.approval == Approval("approvers", 1, frozenset(), frozenset({"zed"}))
    carol = RULES.entitlement("p1-carol")
    assert carol is not None and carol.reason_required  # the default, and a must for auto
    assert carol.approval == Approval("auto", 0, frozenset(), frozenset())
    assert carol.extend_requires_approval is False  # the default for auto


@pytest.mark.parametrize(
    ("durations", "offered", "default", "maximum"),
    [
        ("{default: 1h}", (3600,), 3600, 3600),
        ("{default: 30s, max: 1d}", (30,), 30, 86400),
        # Offered values are sorted; max defaults to the longest duration named.
        ("{offered: [4h, 15m, 1h], default: 1h}", (900, 3600, 14400), 3600, 14400),
        ("{offered: [90, 5m], default: 90, max: 1h30m}", (90, 300), 90, 5400),
        ("{offered: [1.5h], default: 5400}", (5400,), 5400, 5400),
        ("{offered: ['2h', 1w], default: 2H}", (7200, 604800), 7200, 604800),
        ("{offered: [0.5], default: 0.5s, max: 1}", (0.5,), 0.5, 1),
    ],
)
def test_durations(
    durations: str, offered: tuple[float, ...], default: float, maximum: float
) -> None:
    ent = compile_text(entitlement_yaml(durations=durations), "t.yaml").entitlements[0]
    assert (ent.durations, ent.default_duration, ent.max_duration) == (offered, default, maximum)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(90, "1m30s"), (14400, "4h"), (5400, "1h30m"), (86400, "1d"), (0.5, "0.5s"), (45, "45s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_ticket_pending_ttl_extend_and_break_glass() -> None:
    ent = compile_text(
        entitlement_yaml(
            ticket=r"{pattern: '^(INC|SUP)-\d+$'}",
            pending_ttl="30m",
            approval="{mode: approvers, approvers: {groups: [security]}}",
            extend="{requires_approval: false}",
            break_glass="true",
        ),
        "t.yaml",
    ).entitlements[0]
    assert ent.ticket_pattern is not None and ent.ticket_pattern.pattern == r"^(INC|SUP)-\d+$"
    assert ent.ticket_ok("INC-42") and ent.ticket_ok("SUP-1")
    assert not ent.ticket_ok("INC-42 and more") and not ent.ticket_ok("INC-")
    assert not ent.ticket_ok("") and not ent.ticket_ok(None)
    assert ent.pending_ttl == 1800
    assert ent.approval == Approval("approvers", 1, frozenset({"security"}), frozenset())
    assert ent.extend_requires_approval is False and ent.break_glass is True
    no_ticket = compile_text(entitlement_yaml(), "t.yaml").entitlements[0]
    assert no_ticket.ticket_ok(None) and no_ticket.ticket_ok("anything")


def test_break_glass_filter() -> None:
    # On-call engineers in eng are admitted by both project rules: an ordinary request
    # gets project-wide, an explicit break-glass request the break-glass rule.
    ordinary = POLICY.entitlement_for("project:1", "olga", ["eng", "oncall"], break_glass=False)
    emergency = POLICY.entitlement_for("project:1", "olga", ["eng", "oncall"], break_glass=True)
    first = POLICY.entitlement_for("project:1", "olga", ["eng", "oncall"])
    assert (ordinary and ordinary.id, emergency and emergency.id) == ("project-wide", "break-glass")
    assert first == ordinary
    # On-call alone never lands on break-glass by accident.
    assert POLICY.entitlement_for("project:1", "olga", ["oncall"], break_glass=False) is None


def test_shipped_entitlements() -> None:
    assert [e.id for e in POLICY.entitlements] == ["demo-recordings", "project-wide", "break-glass"]
    demo = POLICY.entitlement_for("recording:1/demo-1", "alice", [])
    assert demo is not None and demo.id == "demo-recordings"
    assert demo.durations == (300, 900, 3600)
    assert (demo.default_duration, demo.max_duration) == (900, 3600)
    assert demo.approval.mode == "auto" and demo.reason_required
    assert POLICY.entitlement_for("project:1", "alice", []) is None
    wide = POLICY.entitlement_for("project:1", "sam", ["support-leads"])
    assert wide is not None and wide.id == "project-wide"
    assert wide.ticket_ok("INC-7") and not wide.ticket_ok("ticket 42")
    assert (wide.pending_ttl, wide.approval.count) == (1800, 1)
    assert wide.may_approve("ann", ["approvers"]) and not wide.may_approve("ann", ["eng"])
    glass = POLICY.entitlement("break-glass")
    assert glass is not None and glass.break_glass and glass.may_approve("sec", ["security"])
    assert [e.id for e in POLICY.entitlements_for_scope("project:1")] == [
        "project-wide", "break-glass",
    ]  # fmt: skip


_BASE = {
    "id": "e",
    "scopes": '["s:{a}"]',
    "who": "any",
    "durations": "{default: 1h}",
    "approval": "{mode: auto}",
}


def entitlement_yaml(**fields: str | None) -> str:
    """Return a policy with one entitlement, a field a line: id on line 3, then _BASE order."""
    lines = ["routes: []", "entitlements:"]
    for key, value in {**_BASE, **fields}.items():
        if value is not None:
            lines.append(("    " if len(lines) > 2 else "  - ") + f"{key}: {value}")
    return "\n".join(lines) + "\n"


def at(line: int, text: str, item: int = 0) -> str:
    return f"t.yaml:{line}: entitlements[{item}].{text}"


APPROVERS = "{mode: approvers, approvers: {groups: [sec]}}"
SCOPES_REQUIRED = "scopes: is required: a non-empty list of scope templates"
BRACES = "malformed braces: a parameter is {name} (letters, digits, '_')"
PEOPLE = "{groups: [...], users: [...]}"
DURATIONS_REQUIRED = "durations: is required: {offered: [...], default: ..., max: ...}"
USE = "(use e.g. 90s, 5m, 2h, 1d)"
APPROVAL_REQUIRED = (
    f"approval: is required: {{mode: auto}} or {{mode: approvers, approvers: {PEOPLE}}}"
)
TICKET_REQUIRED = "ticket.pattern: is required: a regular expression the whole ticket must match"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"colour": "red"}, [at(8, "colour: unknown field (known: approval, break_glass, "
                                   "description, durations, extend, id, pending_ttl, reason, "
                                   "scopes, ticket, who)")]),
        ({"id": None}, [at(3, "id: is required: letters, digits, '.', '_' or '-'")]),
        ({"id": "'a b'"}, [at(3, "id: is required: letters, digits, '.', '_' or '-'")]),
        ({"description": "[x]"}, [at(8, "description: must be a string")]),
        # scopes
        ({"scopes": None}, [at(3, SCOPES_REQUIRED)]),
        ({"scopes": "[]"}, [at(4, SCOPES_REQUIRED)]),
        ({"scopes": "'s:{a}'"}, [at(4, SCOPES_REQUIRED)]),
        ({"scopes": "['s:{a}', '']"}, [at(4, "scopes[1]: must be a non-empty string")]),
        ({"scopes": "['s:{a}', 7]"}, [at(4, "scopes[1]: must be a non-empty string")]),
        ({"scopes": "['s:{a']"}, [at(4, f"scopes[0]: {BRACES}")]),
        ({"scopes": "['s:{1a}']"}, [at(4, f"scopes[0]: {BRACES}")]),
        ({"scopes": "['s:{}']"}, [at(4, f"scopes[0]: {BRACES}")]),
        ({"scopes": "['s:{a}/{a}']"}, [at(4, "scopes[0]: parameter {a} appears twice")]),
        ({"scopes": "['s:{a}', 's:{a}']"}, [at(4, "scopes[1]: duplicate scope 's:{a}'")]),
        # who
        ({"who": None}, [at(3, f"who: is required: 'any' or {PEOPLE}")]),
        ({"who": "everyone"}, [at(5, f"who: must be 'any' or {PEOPLE}")]),
        ({"who": "{groups: []}"}, [at(5, "who: must name at least one group or user")]),
        ({"who": "{}"}, [at(5, "who: must name at least one group or user")]),
        ({"who": "{groups: eng}"}, [at(5, "who.groups: must be a list of names")]),
        ({"who": "{users: ['']}"}, [at(5, "who.users: must be a list of names")]),
        ({"who": "{teams: [x]}"}, [at(5, "who.teams: unknown field (known: groups, users)"),
                                   at(5, "who: must name at least one group or user")]),
        # durations
        ({"durations": None}, [at(3, DURATIONS_REQUIRED)]),
        ({"durations": "1h"}, [at(6, DURATIONS_REQUIRED)]),
        ({"durations": "{max: 1h}"}, [at(6, "durations.default: is required")]),
        ({"durations": "{default: 1h, min: 1m}"},
         [at(6, "durations.min: unknown field (known: default, max, offered)")]),
        ({"durations": "{default: soon}"},
         [at(6, f"durations.default: invalid duration 'soon' {USE}")]),
        ({"durations": "{default: -5m}"},
         [at(6, f"durations.default: invalid duration '-5m' {USE}")]),
        ({"durations": "{default: 0}"},
         [at(6, "durations.default: duration must be positive, got 0")]),
        ({"durations": "{default: -30}"},
         [at(6, "durations.default: duration must be positive, got -30")]),
        ({"durations": "{default: true}"},
         [at(6, "durations.default: must be a duration such as 90s, 5m, 2h or 1d, or seconds")]),
        ({"durations": "{default: .inf}"},
         [at(6, "durations.default: duration must be finite, got inf")]),
        ({"durations": "{default: 1h, max: 0s}"},
         [at(6, "durations.max: duration must be positive, got '0s'")]),
        ({"durations": "{offered: [], default: 1h}"},
         [at(6, "durations.offered: must be a non-empty list of durations")]),
        ({"durations": "{offered: 1h, default: 1h}"},
         [at(6, "durations.offered: must be a non-empty list of durations")]),
        ({"durations": "{offered: [15m, x], default: 15m}"},
         [at(6, f"durations.offered[1]: invalid duration 'x' {USE}")]),
        ({"durations": "{offered: [15m, 900], default: 15m}"},
         [at(6, "durations.offered[1]: duplicate duration 15m")]),
        ({"durations": "{offered: [15m, 8h], default: 15m, max: 4h}"},
         [at(6, "durations.offered[1]: must not exceed max (4h)")]),
        ({"durations": "{default: 8h, max: 4h}"},
         [at(6, "durations.default: must not exceed max (4h)")]),
        ({"durations": "{offered: [15m, 1h], default: 30m}"},
         [at(6, "durations.default: must be one of the offered durations (15m, 1h)")]),
        # reason, ticket, pending_ttl
        ({"reason": "maybe"}, [at(8, "reason: must be 'required' or 'optional'")]),
        ({"ticket": "INC"}, [at(8, "ticket: must be a mapping: {pattern: <regular expression>}")]),
        ({"ticket": "{}"}, [at(8, TICKET_REQUIRED)]),
        ({"ticket": "{pattern: ''}"}, [at(8, TICKET_REQUIRED)]),
        ({"ticket": "{pattern: '(INC'}"},
         [at(8, "ticket.pattern: invalid regular expression: "
                "missing ), unterminated subpattern at position 0")]),
        ({"ticket": "{pattern: x, flags: i}"},
         [at(8, "ticket.flags: unknown field (known: pattern)")]),
        ({"pending_ttl": "soon"}, [at(8, f"pending_ttl: invalid duration 'soon' {USE}")]),
        ({"pending_ttl": "0"}, [at(8, "pending_ttl: duration must be positive, got 0")]),
        # approval
        ({"approval": None}, [at(3, APPROVAL_REQUIRED)]),
        ({"approval": "auto"}, [at(7, APPROVAL_REQUIRED)]),
        ({"approval": "{mode: vote}"},
         [at(7, "approval.mode: must be 'auto' or 'approvers', got 'vote'")]),
        ({"approval": "{count: 1}"}, [at(7, "approval.mode: must be 'auto' or 'approvers'")]),
        ({"approval": "{mode: auto, count: 1}"},
         [at(7, "approval.count: only for mode approvers")]),
        ({"approval": "{mode: auto, approvers: {users: [a]}}"},
         [at(7, "approval.approvers: only for mode approvers")]),
        ({"approval": "{mode: auto, quorum: 2}"},
         [at(7, "approval.quorum: unknown field (known: approvers, count, mode)")]),
        ({"approval": "{mode: approvers}"},
         [at(7, f"approval.approvers: is required: {PEOPLE} (needed for mode approvers)")]),
        ({"approval": "{mode: approvers, approvers: [sec]}"},
         [at(7, f"approval.approvers: must be {PEOPLE} (needed for mode approvers)")]),
        ({"approval": "{mode: approvers, count: 0, approvers: {groups: [a]}}"},
         [at(7, "approval.count: must be an integer of at least 1")]),
        ({"approval": "{mode: approvers, count: -1, approvers: {groups: [a]}}"},
         [at(7, "approval.count: must be an integer of at least 1")]),
        ({"approval": "{mode: approvers, count: true, approvers: {groups: [a]}}"},
         [at(7, "approval.count: must be an integer of at least 1")]),
        ({"approval": "{mode: approvers, count: '2', approvers: {groups: [a]}}"},
         [at(7, "approval.count: must be an integer of at least 1")]),
        ({"approval": "{mode: approvers, count: 2, approvers: {users: [dave]}}"},
         [at(7, "approval.count: cannot be met: approvers names only 1 user")]),
        ({"approval": "{mode: approvers, approvers: {groups: []}}"},
         [at(7, "approval.approvers: must name at least one group or user")]),
        # extend, break_glass
        ({"extend": "yes"}, [at(8, "extend: must be a mapping: {requires_approval: true|false}")]),
        ({"extend": "{ask: true}"},
         [at(8, "extend.ask: unknown field (known: requires_approval)")]),
        ({"extend": "{requires_approval: 1}", "approval": APPROVERS},
         [at(8, "extend.requires_approval: must be true or false")]),
        ({"extend": "{requires_approval: true}"}, [at(8, "extend.requires_approval: needs approval "
                                                         "mode approvers (auto approval has nobody "
                                                         "to ask)")]),
        ({"break_glass": "'yes'"}, [at(8, "break_glass: must be true or false")]),
        ({"break_glass": "true"}, [at(8, "break_glass: needs approval mode approvers (they review "
                                         "the emergency access)")]),
        ({"approval": APPROVERS, "break_glass": "true", "reason": "optional"},
         [at(9, "reason: must be 'required' for break-glass access (the review needs it)")]),
    ],
)  # fmt: skip
def test_entitlement_errors(fields: dict[str, str | None], expected: list[str]) -> None:
    with pytest.raises(ConfigErrors) as exc:
        compile_text(entitlement_yaml(**fields), "t.yaml")
    assert [str(e) for e in exc.value.errors] == expected


SECOND = "  - {id: e, scopes: [t], who: any, durations: {default: 1m}, approval: {mode: auto}}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("routes: []\nentitlements: {}\n", ["t.yaml:2: entitlements: must be a list"]),
        ("routes: []\nentitlements:\n  - x\n", ["t.yaml:3: entitlements[0]: must be a mapping"]),
        (entitlement_yaml() + SECOND, [at(8, "id: duplicate entitlement id 'e'", item=1)]),
        # Every broken rule is reported, not only the first.
        ("routes: []\nentitlements:\n  - {id: a, scopes: [s], who: any, approval: {mode: auto}}\n"
         "  - {id: b, scopes: [s], who: any, durations: {default: 1m}, approval: {mode: x}}\n",
         [at(3, DURATIONS_REQUIRED),
          at(4, "approval.mode: must be 'auto' or 'approvers', got 'x'", item=1)]),
        ("routes: []\nnope: 1\nentitlements: []\n",
         ["t.yaml:2: nope: unknown field (known: default, entitlements, hierarchy, list_max_bytes, "
          "lists, overrides, preset, routes, sensitivity, version)"]),
    ],
)  # fmt: skip
def test_entitlement_list_errors(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigErrors) as exc:
        compile_text(text, "t.yaml")
    assert [str(e) for e in exc.value.errors] == expected


def test_auto_approval_needs_a_reason_and_identity_only_is_accepted() -> None:
    with pytest.raises(ConfigErrors) as exc:
        compile_text(
            "routes: []\nentitlements:\n  - id: a\n    scopes: [x]\n    who: any\n"
            "    durations: {default: 5m}\n    reason: optional\n    approval: {mode: auto}\n",
            "r.yaml",
        )
    assert "r.yaml:7: entitlements[0].reason: must be 'required' with approval mode auto" in str(
        exc.value
    )
    p = compile_text("routes:\n  - {id: r, path: /x, access: identity-only}\n", "r.yaml")
    assert p.match("GET", "/x").access is Access.IDENTITY


def _first_match_by_scan(policy: Policy, method: str, path: str) -> str:
    """The first-match rule read literally: every route in order, no index."""
    for route in policy.routes:
        if (route.methods is None or method in route.methods) and route.regex.match(path):
            return route.id
    return "_default"


INTERLEAVED = compile_text(
    """\
version: 1
default: identity
routes:
  - {id: api-health, path: /api/health, access: public}
  - {id: any-first, path: "/{tenant}/health", access: public}
  - {id: api-rec, path: "/api/rec/{id}", subpaths: true, access: protected, scope: "rec:{id}"}
  - {id: api-post, methods: [POST], path: /api, subpaths: true, access: blocked}
  - {id: tenant-any, path: "/{tenant}", subpaths: true, access: identity}
  - {id: api-late, path: /api/late, access: public}
  - {id: root, path: /, access: public}
  - {id: static, path: /static, subpaths: true, access: public}
""",
    "interleaved.yaml",
)


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("GET", "/api/health", "api-health"),
        ("GET", "/API/Health", "api-health"),
        ("GET", "/x/health", "any-first"),
        ("GET", "/api/rec/7/events", "api-rec"),
        ("POST", "/api/anything", "api-post"),
        ("GET", "/api/late", "tenant-any"),  # a parameter route earlier in the file wins
        ("GET", "/static/app.js", "tenant-any"),
        ("GET", "/", "root"),
        ("GET", "/nothing/else/here", "tenant-any"),
    ],
)
def test_matching_keeps_policy_order_across_literal_and_parameter_routes(
    method: str, path: str, route: str
) -> None:
    assert INTERLEAVED.match(method, path).route == route
    assert _first_match_by_scan(INTERLEAVED, method, path) == route


def test_many_routes_match_as_a_scan_would() -> None:
    routes = "".join(
        f"  - {{id: r{i}, path: '/seg{i % 50}/{{x}}/n{i}', access: identity}}\n"
        for i in range(2000)
    )
    policy = compile_text(
        f"version: 1\ndefault: public\nroutes:\n{routes}"
        "  - {id: catch, path: '/{a}/{b}', access: blocked}\n",
        "many.yaml",
    )
    paths = [f"/seg{i % 60}/v/n{i}" for i in range(0, 2400, 7)] + ["/seg3/v", "/x/y", "/"]
    for path in paths:
        assert policy.match("GET", path).route == _first_match_by_scan(policy, "GET", path), path


def test_a_repeated_match_is_remembered_and_the_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import proxy.policy

    p = load(ROOT / "config" / "policy.yaml")
    path = "/api/projects/1/session_recordings/demo-1/snapshots"
    first = p.match("GET", path)
    assert first.scopes == ("recording:1/demo-1", "project:1")
    assert p.match("GET", path) is first
    assert p.match("POST", path) is not first  # the method is part of the key
    monkeypatch.setattr(proxy.policy, "MATCH_CACHE", 10)
    for i in range(25):
        assert p.match("GET", f"/api/projects/1/session_recordings/r{i}").scope == (
            f"recording:1/r{i}"
        )
        assert len(p._matched) <= 10

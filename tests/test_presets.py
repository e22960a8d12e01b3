"""Presets: the shipped route tables, how a policy extends and overrides them, the schema,
and the policy tools (`policy explain` names the preset rule, `policy test` ships cases)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, write_config
from jsonschema import Draft202012Validator

from proxy import presets
from proxy.errors import ConfigErrors
from proxy.policy import Access
from proxy.policyfile import compile_text, load

JITGATE = str(Path(sys.executable).parent / "jitgate")
SCHEMA = json.loads((ROOT / "config" / "policy.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
EXAMPLES = ROOT / "config" / "presets"
SNAPSHOTS = "/api/environments/2/session_recordings/r1/snapshots"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JITGATE, *args], capture_output=True, text=True, env={"PATH": "/usr/bin"}, timeout=30
    )


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as exc:
        compile_text(text, "p.yaml")
    return [str(e) for e in exc.value.errors]


# --- the shipped tables --------------------------------------------------------------------


@pytest.mark.parametrize("name", presets.NAMES)
def test_each_table_compiles_and_names_its_sources(name: str) -> None:
    policy = compile_text(f"preset: {name}\n", "p.yaml")
    assert policy.preset is not None and policy.preset.name == name
    assert policy.preset.version and policy.preset.sources
    assert policy.preset.file == f"proxy/presets/{name}.yaml"
    assert all(r.id.startswith(f"{name}.") and r.preset == name for r in policy.routes)
    kinds = {r.access for r in policy.routes}
    assert {Access.PROTECTED, Access.IDENTITY, Access.BLOCKED, Access.PUBLIC} <= kinds
    text, _ = presets.read(name)
    assert VALIDATOR.is_valid(yaml.safe_load(text)), name


@pytest.mark.parametrize("name", presets.NAMES)
def test_schema_knows_every_preset(name: str) -> None:
    assert name in SCHEMA["properties"]["preset"]["enum"]
    assert sorted(SCHEMA["properties"]["preset"]["enum"]) == sorted(presets.NAMES)


def test_posthog_covers_both_url_families() -> None:
    policy = compile_text("preset: posthog\n", "p.yaml")
    api = {r.id: r for r in policy.routes if r.regex.pattern.startswith("/api/")}
    env = {i.removesuffix("-env") for i in api if i.endswith("-env")}
    # Comments are registered on projects_router only (posthog/api/__init__.py).
    project_only = {"posthog.comments"}
    assert env and env == {i for i in api if not i.endswith("-env")} - project_only
    for rid in env:  # the same access and scope under /api/projects/ and /api/environments/
        assert (api[rid].access, api[rid].scope) == (
            api[f"{rid}-env"].access,
            api[f"{rid}-env"].scope,
        )
    projects = policy.match("GET", "/api/projects/2/session_recordings/r1/snapshots")
    environments = policy.match("GET", SNAPSHOTS)
    assert projects.scopes == environments.scopes == ("recording:2/r1", "project:2")
    for fam in ("projects", "environments"):
        base = f"/api/{fam}/2"
        assert policy.match("POST", f"{base}/query").access is Access.BLOCKED
        assert policy.match("GET", f"{base}/session_recordings").access is Access.IDENTITY
        share = policy.match("PATCH", f"{base}/session_recordings/r1/sharing")
        assert share.access is Access.BLOCKED


def test_a_table_is_not_a_policy() -> None:
    # The `about:` block belongs to shipped tables only.
    assert errors("preset: posthog\nabout: {tool: x, version: y, sources: []}\n") == [
        "p.yaml:2: about: unknown field (known: default, entitlements, hierarchy, list_max_bytes, "
        "lists, overrides, preset, routes, sensitivity, version)"
    ]


def test_unknown_preset_is_an_error() -> None:
    assert errors("preset: fullstory\n") == [
        "p.yaml:1: preset: must be one of highlight, openreplay, posthog, rrweb-generic, sentry"
    ]


# --- extend: the policy's own routes come first --------------------------------------------


def test_own_routes_take_precedence_and_hierarchy_is_added() -> None:
    text = """
preset: posthog
routes:
  - {id: my-list, path: "/api/projects/{project}/session_recordings", scope: "project:{project}"}
hierarchy:
  - {scope: "project:{project}", covered_by: ["org:all"]}
"""
    policy = compile_text(text, "p.yaml")
    assert policy.routes[0].id == "my-list" and policy.routes[0].preset is None
    got = policy.match("GET", "/api/projects/2/session_recordings")
    assert (got.route, got.access, got.preset) == ("my-list", Access.PROTECTED, None)
    # The preset's own list route still answers the other family.
    env = policy.match("GET", "/api/environments/2/session_recordings")
    assert (env.route, env.preset) == ("posthog.recording-list-env", "posthog")
    # Own hierarchy first, then the preset's: recording -> project -> org.
    assert policy.match("GET", SNAPSHOTS).scopes == ("recording:2/r1", "project:2", "org:all")


def test_default_comes_from_the_preset_unless_the_policy_sets_one() -> None:
    assert compile_text("preset: posthog\n", "p.yaml").default is Access.IDENTITY
    assert compile_text("preset: posthog\ndefault: blocked\n", "p.yaml").default is Access.BLOCKED


def test_own_route_cannot_take_a_preset_id() -> None:
    text = "preset: posthog\nroutes:\n  - {id: posthog.query, path: /q, access: public}\n"
    assert errors(text) == [
        "p.yaml:3: routes[0].id: the posthog. prefix names preset routes: change them in overrides:"
    ]


def test_version_changes_with_the_table() -> None:
    one = compile_text("preset: posthog\n", "p.yaml").version
    two = compile_text("preset: rrweb-generic\n", "p.yaml").version
    assert one != two
    assert compile_text("preset: posthog\n", "q.yaml").version == one


# --- override: replace or disable by id ---------------------------------------------------


def test_override_replaces_fields_in_place() -> None:
    text = """
preset: posthog
overrides:
  - {id: posthog.query-env, access: identity}
  - id: posthog.recording-list
    scope: "project:{project}"
    access: protected
"""
    policy = compile_text(text, "p.yaml")
    plain = compile_text("preset: posthog\n", "p.yaml")
    assert [r.id for r in policy.routes] == [r.id for r in plain.routes]  # order kept
    query = policy.match("GET", "/api/environments/2/query/q1")  # an async query's results
    assert (query.route, query.access, query.preset) == (
        "posthog.query-env",
        Access.IDENTITY,
        "posthog",
    )
    assert policy.match("GET", "/api/projects/2/query/q1").access is Access.BLOCKED
    listed = policy.match("GET", "/api/projects/2/session_recordings")
    assert (listed.access, listed.scope) == (Access.PROTECTED, "project:2")


def test_override_to_a_non_protected_access_drops_the_scope() -> None:
    text = "preset: posthog\noverrides:\n  - {id: posthog.recording, access: blocked}\n"
    got = compile_text(text, "p.yaml").match("GET", "/api/projects/2/session_recordings/r1")
    assert (got.access, got.scope) == (Access.BLOCKED, None)


def test_disabled_route_falls_through() -> None:
    text = "preset: posthog\noverrides:\n  - {id: posthog.query, disabled: true}\n"
    policy = compile_text(text, "p.yaml")
    assert "posthog.query" not in {r.id for r in policy.routes}
    got = policy.match("GET", "/api/projects/2/query/q1")
    assert (got.route, got.access) == ("_default", Access.IDENTITY)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ("  - {id: posthog.quer, access: public}\n",
         ["p.yaml:4: overrides[0].id: preset posthog has no route 'posthog.quer'; did you "
          "mean posthog.query?"]),
        ("  - {id: zzz, access: public}\n",
         ["p.yaml:4: overrides[0].id: preset posthog has no route 'zzz' "
          "(docs/presets/posthog.md lists them)"]),
        ("  - {access: public}\n",
         ["p.yaml:4: overrides[0].id: is required: the id of a route of preset posthog, "
          "e.g. posthog.batch-check-exists"]),
        ("  - {id: posthog.query, access: public}\n  - {id: posthog.query, disabled: true}\n",
         ["p.yaml:5: overrides[1].id: 'posthog.query' is overridden twice"]),
        ("  - {id: posthog.query, disabled: true, access: public}\n",
         ["p.yaml:4: overrides[0].disabled: must be true, alone: a disabled route takes no "
          "other fields"]),
        ("  - {id: posthog.query}\n",
         ["p.yaml:4: overrides[0]: give the fields to replace (methods, path, subpaths, access, "
          "scope, query, description, blobs) or disabled: true"]),
        ("  - {id: posthog.query, acess: public}\n",
         ["p.yaml:4: overrides[0].acess: unknown field (known: access, blobs, description, "
          "disabled, id, methods, path, query, scope, subpaths)",
          "p.yaml:4: overrides[0]: give the fields to replace (methods, path, subpaths, access, "
          "scope, query, description, blobs) or disabled: true"]),
        ("  - {id: posthog.query, access: protected, scope: 'x:{nope}'}\n",
         ["p.yaml:4: overrides[0].scope: unknown parameter {nope}"]),
    ],
)  # fmt: skip
def test_override_errors_name_the_policy_line(overrides: str, expected: list[str]) -> None:
    assert errors(f"preset: posthog\n\noverrides:\n{overrides}") == expected


def test_overrides_need_a_preset() -> None:
    assert errors("routes: []\noverrides: []\n") == [
        "p.yaml:2: overrides: needs a preset (preset: NAME)"
    ]


# --- the shipped example policies, their schema and their cases ------------------------------


@pytest.mark.parametrize("name", presets.NAMES)
def test_example_policy_is_schema_valid_and_its_cases_pass(name: str) -> None:
    policy = EXAMPLES / f"{name}.yaml"
    assert VALIDATOR.is_valid(yaml.safe_load(policy.read_text()))
    assert load(policy).preset is not None
    out = run("policy", "test", str(EXAMPLES / f"{name}.tests.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].endswith(" passed, 0 failed")
    assert "PASS" in out.stdout and "FAIL" not in out.stdout


def test_schema_rejects_what_the_compiler_rejects() -> None:
    bad = {"preset": "posthog", "overrides": [{"id": "posthog.query"}]}
    assert not VALIDATOR.is_valid(bad)
    assert not VALIDATOR.is_valid({"preset": "nope"})
    assert VALIDATOR.is_valid({"preset": "posthog"})


def test_a_failing_preset_case_exits_1(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("preset: posthog\n")
    (tmp_path / "t.yaml").write_text(
        "cases:\n  - name: query is open\n    request: POST /api/projects/2/query\n"
        "    user: alice\n    expect: allow\n"
    )
    out = run("policy", "test", str(tmp_path / "t.yaml"))
    assert out.returncode == 1
    assert "FAIL query is open: expected allow, got blocked" in out.stdout


# --- explain names the preset rule --------------------------------------------------------


def test_explain_shows_the_preset_and_route(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None, policy_text="preset: posthog\n"
    )
    out = run("policy", "explain", "--config", str(cfg), "--no-redis", "--user", "alice", "GET",
              "/static/%2e%2e" + SNAPSHOTS + "?source=blob_v2")  # fmt: skip
    assert out.returncode == 1, out.stderr
    rows = dict(line.split("  ", 1) for line in out.stdout.splitlines() if "  " in line)
    assert rows["route"].strip() == "posthog.recording-env (protected)"
    assert rows["preset"].strip() == (
        "posthog: route recording-env (PostHog master@129fc2db, proxy/presets/posthog.yaml)"
    )
    assert rows["scope"].strip() == "recording:2/r1"

    out = run("policy", "explain", "--config", str(cfg), "--json", "GET", "/api/projects/2/query/q")
    got = json.loads(out.stdout)
    assert (got["route"], got["preset"], got["decision"]) == ("posthog.query", "posthog", "blocked")
    assert got["policy"]["preset"]["name"] == "posthog"
    assert "posthog/api/__init__.py@129fc2db" in got["policy"]["preset"]["sources"]

    out = run("policy", "explain", "--config", str(cfg), "--json", "GET", "/nowhere")
    assert json.loads(out.stdout)["preset"] is None  # the default is no preset rule


def doc_examples() -> list[tuple[str, str]]:
    """The `$ ...` command blocks of docs/policy.md that use a preset, with their output."""
    text = (ROOT / "docs" / "policy.md").read_text()
    out = []
    for block in text.split("```")[1::2]:
        lines = [line.strip() for line in block.strip("\n").splitlines()]
        if lines and lines[0].startswith("$ ") and "presets/" in lines[0]:
            out.append((lines[0][2:], "\n".join(lines[1:])))
    return out


@pytest.mark.parametrize(("command", "shown"), doc_examples(), ids=lambda v: v[:60])
def test_doc_commands_run_as_shown(command: str, shown: str) -> None:
    env = {"PATH": f"{Path(JITGATE).parent}:/usr/bin"}
    words = shlex.split(command)
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    out = subprocess.run(
        words, capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False
    )
    got = [line.strip() for line in out.stdout.splitlines()]
    want = shown.splitlines()
    if "..." in want:  # an elided middle: compare the first and the last lines
        cut = want.index("...")
        assert got[:cut] == want[:cut] and got[-(len(want) - cut - 1) :] == want[cut + 1 :]
    else:
        assert got == want

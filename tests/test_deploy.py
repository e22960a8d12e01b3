"""The Dockerfile, deploy/compose.yaml and deploy/kubernetes/ name only what exists.

No image is built and no cluster runs here. In their place: the commands are parsed by
jitgate's own argument parser; each config is loaded by jitgate's settings loader inside
the files its container mounts (so every key, path and port is checked, and what jitgate
writes must be on a writable volume); every Kubernetes object is validated against the
`kubernetes` client's models with unknown fields refused; the kustomizations are resolved
by hand (and by `kubectl kustomize` where kubectl is installed); the probe paths are asked
of a real jitgate. Each checker is also shown catching a deliberate mistake.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from conftest import ROOT, ProxyFactory, Upstream, free_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from deploykit import (
    Image,
    Mount,
    check_container_config,
    check_dockerfile,
    check_jitgate_argv,
    check_object,
    kustomize,
    option,
    policy_mount_is_a_directory,
    probe_url,
)
from waiting import eventually
from yarl import URL

from proxy.settings import Settings

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
KUBE = ROOT / "deploy" / "kubernetes"
BASE, OVERLAY = KUBE / "base", KUBE / "overlays" / "example"
JITGATE_LABELS = {"app.kubernetes.io/name": "jitgate"}


def image() -> Image:
    found, problems = check_dockerfile(DOCKERFILE.read_text())
    assert problems == []
    return found


# --- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["serve", "--workerz", "2"], ["serv"], ["serve", "--config"], ["serve", "extra"], []],
)
def test_a_wrong_command_or_flag_is_caught(argv: list[str]) -> None:
    problems = check_jitgate_argv(argv)
    assert len(problems) == 1 and problems[0].startswith("jitgate")


def test_real_commands_pass() -> None:
    assert check_jitgate_argv(["serve", "--config", "/etc/jitgate/jitgate.yaml"]) == []
    assert check_jitgate_argv(["check", "--config", "x.yaml"]) == []


def unit_commands(text: str) -> list[list[str]]:
    """The jitgate command lines a systemd unit runs (ExecStart=, ExecStartPre=, ...)."""
    out = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.startswith("Exec") and value.split(" ", 1)[0].endswith("/bin/jitgate"):
            out.append(shlex.split(value)[1:])
    return out


def test_the_systemd_unit_runs_real_commands() -> None:
    text = (ROOT / "deploy" / "jitgate.service").read_text()
    commands = unit_commands(text)
    assert [argv[0] for argv in commands] == ["check", "serve"]
    assert [p for argv in commands for p in check_jitgate_argv(argv)] == []
    # With workers, SIGTERM must reach the supervisor alone, which drains them in order.
    assert option(commands[1], "--workers") is not None
    assert "KillMode=mixed" in text.splitlines()
    bad = text.replace("--workers auto", "--workerz auto")
    assert len([p for argv in unit_commands(bad) for p in check_jitgate_argv(argv)]) == 1


# --- the Dockerfile -----------------------------------------------------------------------


def test_dockerfile() -> None:
    found = image()
    assert found.entrypoint == ["jitgate"] and found.cmd[0] == "serve"
    assert found.user.split(":")[0] != "0"
    assert found.volumes == ["/var/lib/jitgate"]
    assert probe_url(found.health) == (8080, "/_jit/healthz")
    assert found.exposed == {8080}
    assert found.health[0] == "python"  # curl is not in the image


DOCKER_MISTAKES = [
    ('CMD ["serve", "--config", "/etc/jitgate/jitgate.yaml"]',
     'CMD ["serve", "--workerz", "2", "--config", "/etc/jitgate/jitgate.yaml"]',
     "unrecognized arguments: --workerz"),
    ('CMD ["serve", "--config", "/etc/jitgate/jitgate.yaml"]',
     'CMD ["serve", "--config", "/etc/jitgate/config.yaml"]', "differs from ENV JITGATE_CONFIG"),
    ('ENTRYPOINT ["jitgate"]', 'ENTRYPOINT ["jitgated"]', "not jitgate's console script"),
    ("COPY proxy ./proxy", "COPY proxies ./proxy", "COPY proxies: no such path"),
    ("COPY pyproject.toml README.md ./", "COPY pyproject.toml CHANGELOG.md ./",
     "excluded by .dockerignore"),
    ("USER 10001:10001", "USER root", "numeric non-root uid"),
    ("FROM ${PYTHON_IMAGE}\n", "FROM python:3.12-bookworm\n", "differs from the build's"),
    ("COPY --from=build /opt/jitgate /opt/jitgate",
     "RUN apt-get install -y gcc\nCOPY --from=build /opt/jitgate /opt/jitgate",
     "build tools in the runtime stage"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "problem"), DOCKER_MISTAKES)
def test_a_dockerfile_mistake_is_caught(old: str, new: str, problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    # The runtime stage's FROM is the last one; the others are replaced where they are.
    if old.startswith("FROM"):
        head, _, tail = text.rpartition(old)
        text = head + new + tail
    else:
        text = text.replace(old, new)
    _, problems = check_dockerfile(text)
    assert any(problem in p for p in problems), problems


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    from deploykit import dockerignore_allows

    patterns = [
        ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and ln[0] != "#"
    ]
    for path in ("pyproject.toml", "README.md", "proxy", "proxy/lua/grant_check.lua"):
        assert dockerignore_allows(patterns, path), path
    for path in (".git", ".venv", "tests", "config/jitgate.yaml", ".jitgate/redis.sock"):
        assert not dockerignore_allows(patterns, path), path


# --- deploy/compose.yaml ------------------------------------------------------------------


def compose_mounts(service: Mapping[str, Any], named: Mapping[str, Any]) -> list[Mount]:
    mounts = []
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        if source.startswith((".", "/")):
            path = (COMPOSE.parent / source).resolve()
            mounts.append(Mount(target, source=path, directory=not path.is_file()))
        else:
            assert source in named, f"volume {source} is not declared"
            mounts.append(Mount(target, writable=True))
        assert mode in ([], ["ro"]), spec
    for spec in service.get("tmpfs", []):
        mounts.append(Mount(spec.split(":")[0], writable=True))
    return mounts


def compose_environ(service: Mapping[str, Any]) -> dict[str, str]:
    """The service's environment, with `${VAR:-default}` given its default."""
    env = service.get("environment", {})
    return {
        k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()
    }  # fmt: skip


def check_compose(
    doc: dict[str, Any], found: Image, tmp: Path
) -> tuple[Settings | None, list[str]]:
    problems: list[str] = []
    services = doc["services"]
    named = doc.get("volumes", {})
    jit = services["jitgate"]
    published = [name for name, s in services.items() if s.get("ports")]
    if published != ["jitgate"]:
        problems.append(f"published ports on {published}: only jitgate's should be")
    for name, s in services.items():
        if s.get("read_only") is not True:
            problems.append(f"{name}: read_only is not true")
        if "healthcheck" not in s:
            problems.append(f"{name}: no healthcheck")
        if (
            "build" in s
            and not (COMPOSE.parent / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
        ):
            problems.append(f"{name}: no Dockerfile at its build context")
    argv = jit.get("command", found.cmd)
    problems += check_jitgate_argv(argv)
    config = option(argv, "--config") or ""
    mounts = compose_mounts(jit, named)
    settings, found_problems = check_container_config(config, mounts, compose_environ(jit), tmp)
    problems += found_problems
    if settings is None:
        return None, problems
    problems += policy_mount_is_a_directory(settings, mounts, tmp)
    ports = {int(p.split(":")[-1]) for p in jit["ports"]}
    if ports != {settings.listen.port} or settings.listen.port not in found.exposed:
        problems.append(
            f"published {ports}, listen.port {settings.listen.port}, EXPOSE {found.exposed}"
        )
    if settings.listen.host not in ("0.0.0.0", "::"):
        problems.append(
            f"listen.host {settings.listen.host}: unreachable from outside the container"
        )
    probe = probe_url(jit["healthcheck"]["test"])
    if probe != (settings.listen.port, f"{settings.prefix}/healthz"):
        problems.append(f"jitgate's healthcheck asks {probe}")
    # The replay app: its flags, its port, and jitgate's upstream pointing at it.
    replay = services["replay"]
    script = replay["command"][0]
    mount = next(
        (m for m in compose_mounts(replay, named) if script.startswith(m.target + "/")), None
    )
    if (
        mount is None
        or mount.source is None
        or not (mount.source / script[len(mount.target) + 1 :]).is_file()
    ):
        problems.append(f"replay: {script} is not in a mounted directory")
    else:
        helptext = subprocess.run(
            [sys.executable, str(mount.source / script[len(mount.target) + 1 :]), "--help"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        for flag in (a for a in replay["command"][1:] if a.startswith("--")):
            if flag not in helptext:
                problems.append(f"replay: {script} has no flag {flag}")
    replay_port = int(option(replay["command"], "--port") or 0)
    upstream = settings.upstream.url
    if (upstream.host, upstream.port) != ("replay", replay_port):
        problems.append(f"upstream.url {upstream} is not the replay service's port {replay_port}")
    if probe_url(replay["healthcheck"]["test"]) != (replay_port, "/healthz"):
        problems.append("replay: the healthcheck asks another port or path")
    # Redis: jitgate's redis.url names the service; AOF is on.
    redis_url = URL(settings.redis.url or "")
    if redis_url.host != "redis" or "redis" not in services:
        problems.append(f"redis.url {settings.redis.url} does not name the redis service")
    redis_cmd = services["redis"]["command"]
    if option(redis_cmd, "--appendonly") != "yes":
        problems.append("redis: AOF (--appendonly yes) is off")
    for name in ("replay", "redis"):
        for net in services[name].get("networks", []):
            if not doc["networks"][net].get("internal"):
                problems.append(f"{name}: on the network {net}, which is not internal")
    return settings, problems


def test_compose(tmp_path: Path) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    settings, problems = check_compose(doc, image(), tmp_path)
    assert problems == []
    assert settings is not None and settings.redis.url == "redis://redis:6379/0"


COMPOSE_MISTAKES = [
    (("jitgate", "command"), ["serve", "--workerz", "2"], "unrecognized arguments"),
    (("jitgate", "environment", "JITGATE_REDIS__URLL"), "redis://redis",
     "redis.urll: unknown field"),
    (("jitgate", "ports"), ["127.0.0.1:8080:8081"], "published {8081}"),
    (("jitgate", "volumes", 1), "../conf:/etc/jitgate/policy:ro", "no such source"),
    (("jitgate", "volumes", 1), "../config/policy.yaml:/etc/jitgate/policy/policy.yaml:ro",
     "mounted as one file"),
    (("jitgate", "volumes", 2), "jitgate-state:/var/lib/jitgat",
     "state_dir /var/lib/jitgate is not on a writable"),
    (("jitgate", "read_only"), False, "jitgate: read_only is not true"),
    (("replay", "ports"), ["8081:8081"], "published ports on ['jitgate', 'replay']"),
    (("replay", "command", 3), "--prot", "has no flag --prot"),
    (("replay", "command", 4), "8082", "not the replay service's port"),
    (("redis", "command"), ["redis-server"], "AOF"),
    (("redis", "command", 2), "no", "AOF"),
    (("networks", "backend", "internal"), False, "not internal"),
]  # fmt: skip


@pytest.mark.parametrize(("at", "value", "problem"), COMPOSE_MISTAKES)
def test_a_compose_mistake_is_caught(
    tmp_path: Path, at: tuple[Any, ...], value: Any, problem: str
) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    node = doc if at[0] == "networks" else doc["services"]
    for key in at[:-1]:
        node = node[key]
    node[at[-1]] = value
    _, problems = check_compose(doc, image(), tmp_path)
    assert any(problem in p for p in problems), problems


# --- Kubernetes ---------------------------------------------------------------------------


def make_secret_files(overlay: Path) -> rsa.RSAPrivateKey:
    """What the operator makes before `kubectl apply -k` (docs/operations.md).

    Returns the identity provider's private key, for tokens the config must accept.
    """
    secrets = overlay / "secrets"
    secrets.mkdir(exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (secrets / "idp-public.pem").write_bytes(pem)
    (secrets / "jitgate.env").write_text(
        f"audit-hmac-key={'a1' * 32}\nredis-password={'b2' * 16}\n"
    )
    return key


@pytest.fixture
def kube(tmp_path: Path) -> Path:
    """A copy of deploy/kubernetes with the overlay's secrets made as the docs say."""
    copied = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copied)
    key = make_secret_files(copied / "overlays" / "example")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (copied / "idp-private.pem").write_bytes(pem)  # the identity provider's, outside the overlay
    return copied


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    # Generated names may carry kustomize's hash suffix.
    return next(
        (
            d
            for d in by_kind(docs, kind)
            if re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])
        ),
        None,
    )


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def contents(obj: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's keys and values (a Secret's `data` is base64)."""
    if obj["kind"] == "Secret" and "data" in obj:
        return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
    return dict(obj.get("data") or obj.get("stringData") or {})


def pod_mounts(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    docs: list[dict[str, Any]],
    *,
    secrets: bool,
) -> tuple[list[Mount], list[str]]:
    """The container's mounts; with secrets=False, Secrets (the overlay's) get stand-in keys."""
    problems = []
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = []
    for vm in container.get("volumeMounts", []):
        vol = volumes.get(vm["name"])
        if vol is None:
            problems.append(f"volumeMount {vm['name']}: no such volume")
            continue
        files: dict[str, str] | None = None
        if "configMap" in vol or "secret" in vol:
            kind, ref = (
                ("ConfigMap", vol["configMap"]["name"])
                if "configMap" in vol
                else ("Secret", vol["secret"]["secretName"])
            )
            obj = named(docs, kind, ref)
            if obj is None and kind == "Secret" and not secrets:
                obj = {"kind": kind, "stringData": {"idp-public.pem": "-"}}
            if obj is None:
                problems.append(f"volume {vm['name']}: no {kind} {ref}")
                continue
            files = contents(obj)
            if "subPath" in vm:
                if vm["subPath"] not in files:
                    problems.append(f"volumeMount {vm['name']}: {ref} has no key {vm['subPath']}")
                files = {vm["subPath"]: files.get(vm["subPath"], "")}
            mounts.append(Mount(vm["mountPath"], files=files, directory="subPath" not in vm))
        elif "emptyDir" in vol:
            mounts.append(Mount(vm["mountPath"], writable=not vm.get("readOnly", False)))
        else:
            problems.append(f"volume {vm['name']}: an unexpected kind of volume")
    return mounts, problems


def pod_environ(
    container: Mapping[str, Any], docs: list[dict[str, Any]]
) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    problems = []
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        secret = named(docs, "Secret", ref["name"])
        data = contents(secret) if secret else {}
        if secret is None or ref["key"] not in data:
            problems.append(f"env {var['name']}: no key {ref['key']} in a Secret {ref['name']}")
        env[var["name"]] = data.get(ref["key"], "x" * 40)
    return env, problems


def check_workload(
    docs: list[dict[str, Any]], tmp: Path, *, secrets: bool
) -> tuple[Settings | None, list[str]]:
    """Check the rendered objects together: the pod, its config, probes, Service, PDB, policies.

    With secrets=False (the base) Secrets come from the overlay and are not looked up.
    """
    problems = [p for d in docs for p in check_object(d)]
    if problems:  # the checks below read a well-formed structure
        return None, problems
    deploy = named(docs, "Deployment", "jitgate")
    if deploy is None:
        return None, [*problems, "no Deployment jitgate"]
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    (c,) = pod["containers"]
    if spec.get("replicas", 1) < 2:
        problems.append(f"replicas {spec.get('replicas')}: at least 2")
    if spec["strategy"]["rollingUpdate"].get("maxUnavailable") != 0:
        problems.append("rollingUpdate.maxUnavailable must be 0 (no dropped requests)")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (
        psc.get("runAsNonRoot") and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    ):
        problems.append("pod securityContext: runAsNonRoot and seccomp RuntimeDefault")
    if not (csc.get("readOnlyRootFilesystem") and csc.get("allowPrivilegeEscalation") is False
            and csc.get("capabilities", {}).get("drop") == ["ALL"]):  # fmt: skip
        problems.append("container securityContext: read-only root, no escalation, drop ALL")
    if not {"cpu", "memory"} <= set(c.get("resources", {}).get("requests", {})):
        problems.append("resources: requests for cpu and memory")
    problems += check_jitgate_argv(c["args"])
    config = option(c["args"], "--config") or ""
    mounts, found = pod_mounts(pod, c, docs, secrets=secrets)
    problems += found
    if secrets:
        environ, found = pod_environ(c, docs)
        problems += found
    else:
        environ = {v["name"]: v.get("value", "x" * 40) for v in c.get("env", [])}
    environ.pop("JITGATE_CONFIG", None)
    settings, found = check_container_config(config, mounts, environ, tmp)
    problems += found
    if settings is None:
        return None, problems
    problems += policy_mount_is_a_directory(settings, mounts, tmp)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if list(ports.values()) != [settings.listen.port]:
        problems.append(f"containerPort {list(ports.values())}, listen.port {settings.listen.port}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet", {})
        if (
            get.get("path") != settings.prefix + path
            or ports.get(get.get("port"), get.get("port")) != settings.listen.port
        ):
            problems.append(f"{probe}: {get} is not {settings.prefix}{path} on the listen port")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = re.search(r"sleep\((\d+)\)", " ".join(pre))
    if not sleep or pod.get("terminationGracePeriodSeconds", 30) <= int(sleep[1]) + 15:
        problems.append("preStop must wait, within a grace period that leaves time to drain")
    # Service, PodDisruptionBudget.
    svc = named(docs, "Service", "jitgate")
    if svc is None or svc["spec"]["selector"] != labels:
        problems.append("no Service selecting the jitgate pods")
    elif any(
        ports.get(p["targetPort"], p["targetPort"]) != settings.listen.port
        for p in svc["spec"]["ports"]
    ):
        problems.append(f"Service targetPort is not the listen port {settings.listen.port}")
    pdb = named(docs, "PodDisruptionBudget", "jitgate")
    if (
        pdb is None
        or not selects(pdb["spec"]["selector"], labels)
        or pdb["spec"].get("minAvailable", 0) < 1
    ):
        problems.append("no PodDisruptionBudget keeping a jitgate pod")
    problems += check_network_policies(docs, labels, settings)
    return settings, problems


def check_network_policies(
    docs: list[dict[str, Any]], labels: Mapping[str, str], settings: Settings
) -> list[str]:
    """The replay tool admits only jitgate's pods; jitgate may reach it and Redis."""
    problems = []
    upstream_port = settings.upstream.url.port
    replay = named(docs, "NetworkPolicy", "replay-tool-only-from-jitgate")
    if replay is None:
        return ["no NetworkPolicy guarding the replay tool"]
    rspec = replay["spec"]
    tool = rspec["podSelector"].get("matchLabels", {})
    if not tool or selects(rspec["podSelector"], labels):
        problems.append(
            "the replay tool's policy must select the replay tool's pods, and only them"
        )
    if "Ingress" not in rspec.get("policyTypes", []) or not rspec.get("ingress"):
        problems.append("the replay tool's policy must restrict ingress")
    for rule in rspec.get("ingress", []):
        peers = rule.get("from")
        if not peers:
            problems.append("an ingress rule without `from` admits everyone")
        for peer in peers or []:
            if set(peer) != {"podSelector"} or not selects(peer["podSelector"], labels):
                problems.append(f"ingress to the replay tool from {peer}: only jitgate's pods")
        if {p.get("port") for p in rule.get("ports", [])} != {upstream_port}:
            problems.append(
                f"ingress ports {rule.get('ports')}: the upstream's port is {upstream_port}"
            )
    own = named(docs, "NetworkPolicy", "jitgate")
    if own is None or not selects(own["spec"]["podSelector"], labels):
        return [*problems, "no NetworkPolicy for jitgate's own pods"]
    egress = own["spec"].get("egress", [])

    def reaches(selector: Mapping[str, Any], port: int | None) -> bool:
        return any(
            any(
                p.get("podSelector", {}).get("matchLabels") == selector.get("matchLabels")
                for p in r.get("to", [])
            )
            and port in {q.get("port") for q in r.get("ports", [])}
            for r in egress
        )

    if not reaches(rspec["podSelector"], upstream_port):
        problems.append(f"jitgate's egress does not reach the replay tool on {upstream_port}")
    redis_port = URL(settings.redis.url or "redis://x").port
    if not any(redis_port in {q.get("port") for q in r.get("ports", [])} for r in egress):
        problems.append(f"jitgate's egress does not reach Redis on {redis_port}")
    ingress_ports = {
        p.get("port") for r in own["spec"].get("ingress", []) for p in r.get("ports", [])
    }
    if settings.listen.port not in ingress_ports:
        problems.append(f"jitgate's ingress does not admit its listen port {settings.listen.port}")
    return problems


def test_kustomize_base(kube: Path, tmp_path: Path) -> None:
    docs, problems = kustomize(kube / "base")
    assert problems == []
    assert {d["kind"] for d in docs} == {
        "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap",
    }  # fmt: skip
    settings, problems = check_workload(docs, tmp_path / "root", secrets=False)
    assert problems == []
    assert settings is not None and settings.audit.strict


def test_kustomize_overlay(kube: Path, tmp_path: Path) -> None:
    docs, problems = kustomize(kube / "overlays" / "example")
    assert problems == []
    assert len(by_kind(docs, "Secret")) == 2
    settings, problems = check_workload(docs, tmp_path / "root", secrets=True)
    assert problems == []
    assert settings is not None
    deploy = named(docs, "Deployment", "jitgate")
    assert deploy is not None and deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith("/jitgate:0.1.0")
    assert str(settings.upstream.url) == "http://posthog-web:8000"
    assert settings.redis.url == f"redis://:{'b2' * 16}@redis-master.redis.svc.cluster.local:6379/0"
    assert all(d["metadata"].get("namespace") == "posthog" for d in docs)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed"
)
@pytest.mark.parametrize("which", ["base", "overlays/example"])
def test_real_kustomize_build_agrees(kube: Path, tmp_path: Path, which: str) -> None:
    overlay = kube / which
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    ours, _ = kustomize(overlay)
    assert sorted(
        (d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in built
    ) == sorted((d["kind"], d["metadata"]["name"]) for d in ours)
    _settings, problems = check_workload(built, tmp_path / "root", secrets=which != "base")
    assert problems == []
    dep, mine = named(built, "Deployment", "jitgate"), named(ours, "Deployment", "jitgate")
    assert dep is not None and mine is not None
    theirs_c, mine_c = (
        dep["spec"]["template"]["spec"]["containers"][0],
        mine["spec"]["template"]["spec"]["containers"][0],
    )
    assert (
        theirs_c["image"] == mine_c["image"] and dep["spec"]["replicas"] == mine["spec"]["replicas"]
    )
    assert [e["name"] for e in theirs_c["env"]] == [e["name"] for e in mine_c["env"]]


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split("/")]
    node = doc
    for k in keys[:-1]:
        node = node[k]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


POD = "spec/template/spec"
C = POD + "/containers/0"
KUBE_MISTAKES = [
    ("Deployment", C + "/readinesProbe", {"httpGet": {"path": "/_jit/readyz", "port": "http"}},
     "readinesProbe: unknown field"),
    ("Deployment", "spec/replicas", "2", "must be int"),
    ("Deployment", C + "/ports/0/containerPort", 8081, "containerPort [8081]"),
    ("Deployment", C + "/args", ["serve", "--workerz", "2"], "unrecognized arguments"),
    ("Deployment", C + "/livenessProbe/httpGet/path", "/_jit/health", "livenessProbe"),
    ("Deployment", C + "/securityContext/readOnlyRootFilesystem", False, "read-only root"),
    ("Deployment", POD + "/securityContext/runAsNonRoot", None, "runAsNonRoot"),
    ("Deployment", C + "/volumeMounts/1",
     {"name": "policy", "mountPath": "/etc/jitgate/policy/policy.yaml", "subPath": "policy.yaml"},
     "mounted as one file"),
    ("Deployment", C + "/volumeMounts/3/mountPath", "/var/lib/jitgat", "not on a writable volume"),
    ("Deployment", C + "/env/1/name", "JITGATE_AUDIT__HMAC", "audit.hmac: unknown field"),
    ("Deployment", "spec/strategy/rollingUpdate/maxUnavailable", 1, "maxUnavailable"),
    ("Deployment", C + "/lifecycle", None, "preStop"),
    ("Service", "spec/ports/0/targetPort", 8000, "targetPort"),
    ("NetworkPolicy", "spec/ingress/0/from/0", {"namespaceSelector": {}}, "only jitgate's pods"),
    ("NetworkPolicy", "spec/ingress/0/from", None, "admits everyone"),
    ("NetworkPolicy", "spec/podSelector/matchLabels", {}, "select the replay tool's pods"),
    ("NetworkPolicy", "spec/ingress/0/ports/0/port", 8080, "the upstream's port is 8000"),
    ("PodDisruptionBudget", "spec/minAvailable", 0, "PodDisruptionBudget"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "path", "value", "problem"), KUBE_MISTAKES)
def test_a_manifest_mistake_is_caught(
    kube: Path, tmp_path: Path, kind: str, path: str, value: Any, problem: str
) -> None:
    docs, problems = kustomize(kube / "overlays" / "example")
    assert problems == []
    docs = copy.deepcopy(docs)
    target = next(d for d in docs if d["kind"] == kind)  # the replay tool's policy comes first
    _set(target, path, value)
    _, problems = check_workload(docs, tmp_path / "root", secrets=True)
    assert any(problem in p for p in problems), problems


def test_a_config_key_that_does_not_exist_is_caught(kube: Path, tmp_path: Path) -> None:
    config = kube / "base" / "jitgate.yaml"
    config.write_text(config.read_text().replace("  timeout: 0.5", "  timout: 0.5"))
    docs, _ = kustomize(kube / "overlays" / "example")
    _, problems = check_workload(docs, tmp_path / "root", secrets=True)
    assert any("redis.timout: unknown field" in p for p in problems), problems


OV = "overlays/example/kustomization.yaml"


@pytest.mark.parametrize(
    ("file", "old", "new", "problem"),
    [
        ("base/kustomization.yaml", "- service.yaml", "- services.yaml",
         "no such file or directory services.yaml"),
        ("base/kustomization.yaml", "- policy.yaml", "- policies.yaml",
         "no such file policies.yaml"),
        (OV, "name: replay-tool-only-from-jitgate", "name: replay-only",
         "no NetworkPolicy/replay-only"),
        (OV, "- path: deployment-patch.yaml", "- path: deploy-patch.yaml",
         "no such file deploy-patch.yaml"),
        ("overlays/example/deployment-patch.yaml", "/containers/0/env/-", "/containers/1/env/-",
         "does not apply"),
        (OV, "  - name: jitgate\n    newName", "  - name: jitgat\n    newName",
         "no container image named jitgat"),
        (OV, "namespace: posthog", "namespaces: posthog",
         "unknown or unsupported field namespaces"),
    ],
)  # fmt: skip
def test_a_kustomization_mistake_is_caught(
    kube: Path, file: str, old: str, new: str, problem: str
) -> None:
    path = kube / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    _, problems = kustomize(kube / "overlays" / "example")
    assert any(problem in p for p in problems), problems


def test_the_overlay_secrets_stay_out_of_git() -> None:
    assert (OVERLAY / ".gitignore").read_text().split() == ["secrets/"]
    spec = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    files = [
        f.split("=")[-1]
        for g in spec["secretGenerator"]
        for f in g.get("files", []) + g.get("envs", [])
    ]
    assert files and all(f.startswith("secrets/") for f in files)
    docs = (ROOT / "docs" / "operations.md").read_text()
    for f in files:
        assert f"{OVERLAY.relative_to(ROOT)}/{f}" in docs, f  # the docs show how to make it


# --- the probes, asked of a real jitgate --------------------------------------------------


async def test_probe_paths_answer_on_a_real_jitgate(make_proxy: ProxyFactory) -> None:
    paths = {probe_url(image().health)[1]}  # type: ignore[index]
    compose = yaml.safe_load(COMPOSE.read_text())
    paths.add(probe_url(compose["services"]["jitgate"]["healthcheck"]["test"])[1])  # type: ignore[index]
    deploy = next(d for d in yaml.safe_load_all((BASE / "deployment.yaml").read_text()) if d)
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    paths |= {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert paths == {"/_jit/healthz", "/_jit/readyz"}
    client = await make_proxy()
    for path in sorted(paths):
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/_jit/healthzz")).status == 404  # a wrong path would show


# --- the container configs, served by a real `jitgate serve` ------------------------------

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"


def paths_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


async def serve_as_in_the_container(
    settings: Settings,
    environ: Mapping[str, str],
    writable: list[Path],
    token: str,
    *,
    upstream: Upstream,
    redis_url: str,
    root: Path,
    tmp: Path,
) -> str:
    """Run `jitgate serve` on a container's config; it must serve and write only to volumes.

    Redis, the upstream and the listen address are the test's; everything else (identity,
    audit, policy, state) is the container's own, in its mounted files. Returns its stdout.
    """
    port = free_port()
    cwd = tmp / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITGATE_")}
    env.update({k: v for k, v in environ.items() if k != "JITGATE_CONFIG"})
    env.update(
        JITGATE_REDIS__URL=redis_url, JITGATE_UPSTREAM__URL=upstream.url,
        JITGATE_LISTEN__HOST="127.0.0.1", JITGATE_LISTEN__PORT=str(port),
        PYTHONDONTWRITEBYTECODE="1",
    )  # fmt: skip
    before = paths_under(root)
    jitgate = Path(sys.executable).parent / "jitgate"
    with (tmp / "stdout").open("wb") as out, (tmp / "stderr").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            str(jitgate), "serve", "--config", str(settings.file),
            cwd=cwd, env=env, stdout=out, stderr=err,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError((tmp / "stderr").read_text())
                try:
                    async with http.get(base + "/_jit/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, within=30, what="jitgate to be ready")
            auth = {"Authorization": f"Bearer {token}"}
            async with http.get(base + SNAPSHOTS, headers=auth) as resp:
                assert resp.status == 403  # identified by the config's keys; no grant
            async with http.get(base + SNAPSHOTS) as resp:
                assert resp.status == 401
            async with http.get(base + "/healthz") as resp:  # public in the policy
                assert resp.status == 200
            assert upstream.paths() == ["/healthz"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
    assert code == 0, (tmp / "stderr").read_text()
    written = paths_under(root) - before
    outside = [p for p in written if not any(p.is_relative_to(w) for w in writable)]
    assert outside == [], "written outside the writable volumes (the root is read-only)"
    assert list(cwd.iterdir()) == []
    return (tmp / "stdout").read_text()


def token_for(settings: Settings, key: Any, algorithm: str) -> str:
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 300}
    claims.update(iss=settings.identity.issuer, aud=settings.identity.audience)
    return jwt.encode(claims, key, algorithm=algorithm)


async def test_the_compose_config_serves_and_writes_only_to_its_volumes(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    root = tmp_path / "root"
    settings, problems = check_compose(doc, image(), root)
    assert problems == [] and settings is not None and settings.identity.hs_secret
    jit = doc["services"]["jitgate"]
    mounts = compose_mounts(jit, doc["volumes"])
    writable = [root / m.target.lstrip("/") for m in mounts if m.writable]
    token = token_for(settings, settings.identity.hs_secret.reveal(), "HS256")
    await serve_as_in_the_container(
        settings, compose_environ(jit), writable, token,
        upstream=upstream, redis_url=redis_url, root=root, tmp=tmp_path,
    )  # fmt: skip
    assert settings.audit.file is not None
    events = [
        json.loads(line)["event"] for line in settings.audit.file.path.read_text().splitlines()
    ]
    assert "access.deny" in events and "access.allow" in events


async def test_the_cluster_config_serves_and_writes_only_to_its_volumes(
    kube: Path, tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    docs, problems = kustomize(kube / "overlays" / "example")
    assert problems == []
    root = tmp_path / "root"
    settings, problems = check_workload(docs, root, secrets=True)
    assert problems == [] and settings is not None
    deploy = named(docs, "Deployment", "jitgate")
    assert deploy is not None
    pod = deploy["spec"]["template"]["spec"]
    mounts, _ = pod_mounts(pod, pod["containers"][0], docs, secrets=True)
    environ, _ = pod_environ(pod["containers"][0], docs)
    writable = [root / m.target.lstrip("/") for m in mounts if m.writable]
    key = serialization.load_pem_private_key((kube / "idp-private.pem").read_bytes(), None)
    stdout = await serve_as_in_the_container(
        settings, environ, writable, token_for(settings, key, "RS256"),
        upstream=upstream, redis_url=redis_url, root=root, tmp=tmp_path,
    )  # fmt: skip
    events = [json.loads(line)["event"] for line in stdout.splitlines()]  # audit.stdout
    assert "access.deny" in events and "access.allow" in events
    assert (root / "var/lib/jitgate/audit-spool").is_dir()


# --- the build stage, run outside Docker --------------------------------------------------


def build_context(root: Path, into: Path) -> Path:
    """Lay out the build stage's WORKDIR as its COPY lines would, within .dockerignore."""
    from deploykit import dockerignore_allows, parse_dockerfile

    patterns = [
        ln.strip() for ln in (root / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]  # fmt: skip
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    froms = [i for i, ins in enumerate(instructions) if ins.cmd == "FROM"]
    build = instructions[froms[0] : froms[1]]
    workdir = next(ins.args for ins in build if ins.cmd == "WORKDIR")
    for ins in build:
        if ins.cmd != "COPY":
            continue
        *sources, dest = ins.args.split()
        for src in sources:
            files = [root / src] if (root / src).is_file() else (root / src).rglob("*")
            for f in files:
                rel = f.relative_to(root).as_posix()
                if not f.is_file() or not dockerignore_allows(patterns, rel):
                    continue
                if dest.endswith("/"):
                    target = into / dest / f.relative_to((root / src).parent)
                else:
                    target = into / dest / f.relative_to(root / src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    assert workdir == "/src"
    return into


def test_the_build_stage_makes_a_complete_wheel(tmp_path: Path) -> None:
    """The build stage's `pip wheel` on exactly what its COPY lines let in.

    pip fetches the build backend (setuptools) from PyPI, as `docker build` would.
    """
    ctx = build_context(ROOT, tmp_path / "src")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("jitgate-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    tracked = subprocess.run(
        ["git", "ls-files", "proxy"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = [f for f in tracked if f not in names]
    assert missing == []  # the Lua scripts, templates, static files and openapi.yaml too
    assert "jitgate = proxy.cli:main" in entry_points

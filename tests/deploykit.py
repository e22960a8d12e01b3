"""Checkers for the deployment files: the Dockerfile, deploy/compose.yaml, deploy/kubernetes/.

Each checker returns the problems it found (an empty list when there are none), so a test
can show that it catches a wrong flag, port, path or config key as well as passing the
real files. Images cannot be built and no cluster runs here: these read the files, ask
jitgate's own argument parser and settings loader, and validate Kubernetes objects
against the models of the `kubernetes` client.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import re
import shlex
import shutil
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import yaml
from kubernetes import client as k8s

from proxy import policyfile
from proxy.errors import ConfigError, ConfigErrors
from proxy.settings import Settings, load

ROOT = Path(__file__).resolve().parent.parent


# --- the jitgate command line -------------------------------------------------------------


def check_jitgate_argv(argv: list[str]) -> list[str]:
    """Parse argv (after `jitgate`) with jitgate's own parser; a problem if it refuses."""
    from proxy.cli.main import _parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(argv)
    except SystemExit:
        last = (err.getvalue().strip().splitlines() or ["exited"])[-1]
        return [f"jitgate {shlex.join(argv)}: {last}"]
    return []


def option(argv: list[str], name: str) -> str | None:
    """Return the value of `--name VALUE` or `--name=VALUE` in argv."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def console_scripts() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["project"]["scripts"])


# --- the Dockerfile -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    cmd: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        text = self.args.strip()
        value = json.loads(text) if text.startswith("[") else shlex.split(text)
        assert isinstance(value, list)
        return [str(v) for v in value]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining `\\` continuations, dropping comments."""
    out: list[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        cmd, _, args = full.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
    return out


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (the last match decides)."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or fnmatch.fnmatchcase(
            path, pat.replace("**/", "*")
        ):
            allowed = negate
    return allowed


@dataclass
class Image:
    """What the final stage of the Dockerfile sets up."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    exposed: set[int] = field(default_factory=set)
    volumes: list[str] = field(default_factory=list)
    user: str = ""
    health: list[str] = field(default_factory=list)


BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|yum|dnf)\b.*\binstall\b|\b(gcc|cc|make|build-essential)\b"
)


def check_dockerfile(text: str, root: Path = ROOT) -> tuple[Image, list[str]]:
    """Check a Dockerfile; return what its final stage sets and the problems found."""
    problems: list[str] = []
    instructions = parse_dockerfile(text)
    args = {}
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.cmd == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            args[name] = default
        elif ins.cmd == "FROM":
            stages.append([ins])
        elif stages:
            stages[-1].append(ins)
    if len(stages) < 2:
        return Image(), ["the Dockerfile must be multi-stage (a build stage, then the runtime)"]

    def base_of(stage: list[Instruction]) -> tuple[str, str]:
        words = stage[0].args.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), words[0])
        name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
        return image, name

    build_image, build_name = base_of(stages[0])
    final_image, _ = base_of(stages[-1])
    if final_image != build_image:
        problems.append(f"runtime base {final_image} differs from the build's {build_image}")
    if not re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim[\w.-]*", final_image):
        problems.append(f"runtime base {final_image} is not a slim Python 3.11+ image")

    patterns = []
    ignore = root / ".dockerignore"
    if ignore.exists():
        patterns = [
            ln.strip() for ln in ignore.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]  # fmt: skip
    image = Image()
    for stage_no, stage in enumerate(stages):
        final = stage_no == len(stages) - 1
        for ins in stage[1:]:
            if ins.cmd == "COPY":
                words = shlex.split(ins.args)
                flags = [w for w in words if w.startswith("--")]
                paths = [w for w in words if not w.startswith("--")]
                if any(f.startswith("--from=") for f in flags):
                    if final and f"--from={build_name}" not in flags:
                        problems.append(f"line {ins.line}: COPY from a stage other than the build")
                    continue
                for src in paths[:-1]:
                    if not (root / src).exists():
                        problems.append(f"line {ins.line}: COPY {src}: no such path in the repo")
                    elif not dockerignore_allows(patterns, src.rstrip("/")):
                        problems.append(f"line {ins.line}: COPY {src}: excluded by .dockerignore")
            if not final:
                continue
            if ins.cmd == "RUN" and BUILD_TOOLS.search(ins.args):
                problems.append(f"line {ins.line}: build tools in the runtime stage: {ins.args}")
            if ins.cmd == "ENV":
                for word in shlex.split(ins.args):
                    key, _, value = word.partition("=")
                    image.env[key] = value
            elif ins.cmd == "EXPOSE":
                image.exposed |= {int(p.split("/")[0]) for p in ins.args.split()}
            elif ins.cmd == "VOLUME":
                image.volumes += ins.exec_form()
            elif ins.cmd == "USER":
                image.user = ins.args
            elif ins.cmd == "ENTRYPOINT":
                image.entrypoint = ins.exec_form()
            elif ins.cmd == "CMD":
                image.cmd = ins.exec_form()
            elif ins.cmd == "HEALTHCHECK":
                _, _, rest = ins.args.partition("CMD ")
                image.health = json.loads(rest) if rest.strip().startswith("[") else []
    uid = image.user.split(":")[0]
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"USER {image.user!r}: must be a numeric non-root uid (runAsNonRoot)")
    if len(image.entrypoint) != 1 or image.entrypoint[0] not in console_scripts():
        problems.append(f"ENTRYPOINT {image.entrypoint}: not jitgate's console script")
    problems += check_jitgate_argv(image.cmd)
    config = option(image.cmd, "--config")
    if config is None or config != image.env.get("JITGATE_CONFIG"):
        problems.append(f"CMD's --config {config} differs from ENV JITGATE_CONFIG")
    if not image.health:
        problems.append("no HEALTHCHECK in exec form")
    return image, problems


def probe_url(argv: list[str]) -> tuple[int, str] | None:
    """Return (port, path) of the http://127.0.0.1 URL a `python -c` probe opens."""
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/[^'\"\s]*)", " ".join(argv))
    return (int(m[1]), m[2]) if m else None


# --- a container's filesystem, and the config it mounts -----------------------------------


@dataclass
class Mount:
    """What one mount puts at its target: a file, a directory, files by name, or a volume."""

    target: str
    source: Path | None = None  # a repo file or directory (bind mount)
    files: Mapping[str, str] | None = None  # a ConfigMap or Secret volume: name -> text
    writable: bool = False  # an empty writable volume (named volume, emptyDir, tmpfs)
    directory: bool = True  # False: one file (a file bind mount, or a subPath)


def materialise(mounts: Iterable[Mount], root: Path) -> list[str]:
    """Lay the mounts out under root; return problems (sources that do not exist)."""
    problems = []
    for m in mounts:
        at = root / m.target.lstrip("/")
        if m.source is not None:
            if not m.source.exists():
                problems.append(f"mount {m.target}: no such source {m.source}")
                continue
            at.parent.mkdir(parents=True, exist_ok=True)
            if m.source.is_dir():
                shutil.copytree(m.source, at, dirs_exist_ok=True)
            else:
                shutil.copyfile(m.source, at)
        elif m.files is not None:
            if m.directory:
                at.mkdir(parents=True, exist_ok=True)
                for name, text in m.files.items():
                    (at / name).write_text(text)
            else:
                at.parent.mkdir(parents=True, exist_ok=True)
                at.write_text(next(iter(m.files.values()), ""))
        else:
            at.mkdir(parents=True, exist_ok=True)
    return problems


def rebase(text: str, mounts: Iterable[Mount], root: Path) -> str:
    """Point absolute paths that lie under a mount target at root; others stay as they are."""
    targets = sorted({m.target for m in mounts}, key=len, reverse=True)
    if not targets:
        return text
    # One pass: a path already pointed at root is never matched again.
    alternation = "|".join(re.escape(t) for t in targets)
    pattern = r"(?<![\w/.-])(" + alternation + r")(?=[/\s\]},\"']|$)"
    return re.sub(pattern, lambda m: str(root) + m[1], text, flags=re.M)


def check_container_config(
    config_path: str,
    mounts: list[Mount],
    environ: Mapping[str, str],
    root: Path,
) -> tuple[Settings | None, list[str]]:
    """Load the config a container mounts with jitgate's loader, inside its mounted files.

    Every path the config names must be inside a mount (the root filesystem is
    read-only); what jitgate writes must be on a writable one.
    """
    problems = materialise(mounts, root)
    target = next((m for m in mounts if m.target == config_path), None)
    if target is None:
        return None, [*problems, f"the config {config_path} is not mounted"]
    config_file = root / config_path.lstrip("/")
    config_file.write_text(rebase(config_file.read_text(), mounts, root))
    env = {k: rebase(v, mounts, root) for k, v in environ.items()}
    try:
        settings = load(config_file, environ=env)
        policyfile.load(settings.policy_file)
    except ConfigErrors as exc:
        return None, problems + [str(e).replace(str(root), "") for e in exc.errors]
    except ConfigError as exc:
        return None, [*problems, str(exc).replace(str(root), "")]
    writable = [root / m.target.lstrip("/") for m in mounts if m.writable]
    writes = {"state_dir": settings.state_dir}
    if settings.audit.spool:
        writes["audit.spool.dir"] = settings.audit.spool_dir or settings.state_dir
    if settings.audit.file is not None:
        writes["audit.file.path"] = settings.audit.file.path.parent
    for key, path in writes.items():
        if not any(path.is_relative_to(w) for w in writable):
            shown = str(path).replace(str(root), "")
            problems.append(f"{key} {shown} is not on a writable volume (read-only root)")
    read = [settings.policy_file, *settings.identity.public_key_files]
    for path in read:
        if not path.is_relative_to(root):
            problems.append(f"{path} is not inside any mount")
    return settings, problems


def policy_mount_is_a_directory(settings: Settings, mounts: list[Mount], root: Path) -> list[str]:
    """The policy's mount must be a directory: a file (or subPath) mount never sees updates."""
    for m in sorted(mounts, key=lambda m: -len(m.target)):
        if settings.policy_file.is_relative_to(root / m.target.lstrip("/")):
            if not m.directory:
                return [f"the policy is mounted as one file at {m.target}: no hot reload"]
            return []
    return ["the policy is not mounted"]


# --- Kubernetes objects -------------------------------------------------------------------

PRIMITIVES = {"str": str, "bytes": str, "int": int, "bool": bool, "float": (int, float)}


def check_model(data: Any, type_name: str, where: str = "") -> list[str]:
    """Check data against a kubernetes client model: unknown fields and wrong types fail."""
    # The client spells containers `List[V1Container]`, `Dict[str, str]` (older: list[...],
    # dict(str, str)).
    if type_name.lower().startswith("list["):
        if not isinstance(data, list):
            return [f"{where}: must be a list"]
        inner = type_name[5:-1]
        return [p for i, v in enumerate(data) for p in check_model(v, inner, f"{where}[{i}]")]
    if type_name.lower().startswith(("dict(", "dict[")):
        if not isinstance(data, dict):
            return [f"{where}: must be a mapping"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [p for k, v in data.items() for p in check_model(v, inner, f"{where}.{k}")]
    if type_name in PRIMITIVES:
        kind = PRIMITIVES[type_name]
        if (isinstance(data, bool) and type_name != "bool") or not isinstance(data, kind):
            return [f"{where}: must be {type_name}, got {data!r}"]
        return []
    if type_name in ("object", "datetime", "date"):
        return []
    klass = getattr(k8s, type_name)
    if not isinstance(data, dict):
        return [f"{where}: must be a mapping ({type_name})"]
    fields = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown field of {type_name}".lstrip("."))
            continue
        problems += check_model(value, klass.openapi_types[fields[key]], f"{where}.{key}")
    return problems


def model_name(doc: Mapping[str, Any]) -> str:
    version = str(doc.get("apiVersion", "")).split("/")[-1]
    return f"{version.capitalize()}{doc.get('kind', '')}"


def check_object(doc: Mapping[str, Any]) -> list[str]:
    """Validate one manifest document strictly, then build it with the client's models."""
    name = model_name(doc)
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if not hasattr(k8s, name):
        return [f"{where}: no model {name} for apiVersion {doc.get('apiVersion')}"]
    problems = [f"{where}: {p}" for p in check_model(doc, name)]
    if not problems:  # then the client's own (pydantic) models check types and values
        try:
            k8s.ApiClient().deserialize(json.dumps(doc), name, "application/json")
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
    return problems


# --- kustomize, resolved by hand ----------------------------------------------------------

KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "patches", "images", "replicas", "namespace", "labels",
    "configMapGenerator", "secretGenerator",
}  # fmt: skip


def _generated(
    kind: str, gen: Mapping[str, Any], base: Path, problems: list[str]
) -> dict[str, Any]:
    data: dict[str, str] = {}
    for entry in gen.get("files", []):
        key, _, rel = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = base / rel
        if not path.is_file():
            problems.append(f"{kind} {gen['name']}: no such file {rel}")
            continue
        data[key or path.name] = path.read_text()
    for rel in gen.get("envs", []):
        path = base / rel
        if not path.is_file():
            problems.append(f"{kind} {gen['name']}: no such file {rel}")
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key.strip()] = value
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    key = "data" if kind == "ConfigMap" else "stringData"  # a Secret's `data` is base64
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}, key: data}


def kustomize(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Resolve a kustomization by hand: resources, generators, patches, images, replicas.

    Not kustomize: enough to show that every file it names exists, that each patch targets
    an object by kind and name and applies, and to hand the result to the checks above.
    Generated objects keep their plain names (kustomize adds a hash suffix).
    """
    problems: list[str] = []
    file = directory / "kustomization.yaml"
    if not file.is_file():
        return [], [f"{directory}: no kustomization.yaml"]
    spec = yaml.safe_load(file.read_text())
    problems += [
        f"{file.name}: unknown or unsupported field {k}" for k in set(spec) - KUSTOMIZATION_KEYS
    ]
    docs: list[dict[str, Any]] = []
    for rel in spec.get("resources", []):
        path = directory / rel
        if path.is_dir():
            sub, sub_problems = kustomize(path)
            docs += sub
            problems += [f"{rel}: {p}" for p in sub_problems]
        elif path.is_file():
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            problems.append(f"resources: no such file or directory {rel}")
    for gen in spec.get("configMapGenerator", []):
        docs.append(_generated("ConfigMap", gen, directory, problems))
    for gen in spec.get("secretGenerator", []):
        docs.append(_generated("Secret", gen, directory, problems))

    def find(kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)

    for patch in spec.get("patches", []):
        path = directory / patch.get("path", "")
        target = patch.get("target", {})
        if not path.is_file():
            problems.append(f"patches: no such file {patch.get('path')}")
            continue
        doc = find(target.get("kind", ""), target.get("name", ""))
        if doc is None:
            problems.append(f"patch {path.name}: no {target.get('kind')}/{target.get('name')}")
            continue
        ops = yaml.safe_load(path.read_text())
        if not isinstance(ops, list):
            problems.append(f"patch {path.name}: only JSON patches (RFC 6902) are resolved here")
            continue
        try:
            patched = jsonpatch.apply_patch(doc, ops)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            problems.append(f"patch {path.name}: does not apply: {exc}")
            continue
        docs[docs.index(doc)] = patched
    for img in spec.get("images", []):
        hits = 0
        for d in docs:
            for c in _containers(d):
                if c["image"].split(":")[0] == img["name"]:
                    tag = img.get("newTag", c["image"].partition(":")[2])
                    c["image"] = f"{img.get('newName', img['name'])}:{tag}"
                    hits += 1
        if not hits:
            problems.append(f"images: no container image named {img['name']}")
    for rep in spec.get("replicas", []):
        doc = find("Deployment", rep["name"])
        if doc is None:
            problems.append(f"replicas: no Deployment {rep['name']}")
        else:
            doc["spec"]["replicas"] = rep["count"]
    if "namespace" in spec:
        for d in docs:
            d["metadata"]["namespace"] = spec["namespace"]
    return docs, problems


def _containers(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") != "Deployment":
        return []
    spec = doc["spec"]["template"]["spec"]
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))

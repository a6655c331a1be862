"""Run a Dockerfile's project-installing steps without a container engine.

What a container build of our images does that can go wrong in the repository is: which files
the build context holds (the per-Dockerfile ``.dockerignore``), what the ``COPY``s take from
it, and the ``RUN``s that build and install the project. This module reproduces exactly
those, on this machine, under a scratch root that stands for each stage's file system:

- :func:`build_context` applies BuildKit's ignore rules (Go ``filepath.Match`` patterns with
  ``**``, ``!`` exceptions, the last matching line wins, a pattern that matches a folder
  matches everything in it) to the files of the repository.
- :class:`Build` walks the stages: ``ARG`` (build arguments override defaults), ``ENV``,
  ``WORKDIR``, ``COPY`` (from the context or ``--from`` an earlier stage), and ``RUN``, whose
  ``&&``-joined commands run when they start with ``python``/``python3`` (pip, venv, checks)
  and are recorded as skipped otherwise (``apt-get``, ``useradd``: the base image's business).
  Container paths are mapped into the scratch root; each stage's ``python3`` is a fresh
  virtual environment standing for the base image's interpreter (a copy of one made per
  process: the same files as a new one, without running ``ensurepip`` each time).
"""

from __future__ import annotations

import atexit
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import venv
from dataclasses import dataclass, field
from pathlib import Path

# ---- build context ------------------------------------------------------------------------


def _segment_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):  # "**/" also matches no folder at all
                out = out[:-2] + "(?:.*/)?"
                i += 1
            continue
        char = pattern[i]
        out += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
        i += 1
    return out


@dataclass(frozen=True)
class IgnoreRule:
    regex: re.Pattern[str]
    exclude: bool


def parse_dockerignore(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        if fnmatch.fnmatch(pattern, "*[[]*"):
            raise ValueError(f"character classes are not supported here: {line!r}")
        rules.append(IgnoreRule(re.compile(_segment_regex(pattern) + r"\Z"), exclude))
    return rules


def is_excluded(path: str, rules: list[IgnoreRule]) -> bool:
    """BuildKit's rule: a pattern matches a path or one of its parent folders; the last
    matching rule decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        if any(rule.regex.match(prefix) for prefix in prefixes):
            excluded = rule.exclude
    return excluded


def build_context(root: Path, ignore_file: Path) -> list[str]:
    """Files (relative paths) of ``root`` that a build with this ignore file sees."""
    rules = parse_dockerignore(ignore_file.read_text())
    negations = [rule for rule in rules if not rule.exclude]
    kept = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel + "/"
        # Prune folders that are excluded for good (no exception could bring a file back).
        dirs[:] = [
            d for d in dirs if not (is_excluded(rel + d, rules) and not negations) and d != ".git"
        ]
        kept += [rel + name for name in files if not is_excluded(rel + name, rules)]
    return sorted(kept)


# ---- the steps ----------------------------------------------------------------------------


def parse_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


@dataclass
class Stage:
    name: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"


@dataclass
class Build:
    """One Dockerfile's steps, run under ``scratch`` with ``context`` as the build context."""

    dockerfile: Path
    context: Path
    scratch: Path
    build_args: dict[str, str] = field(default_factory=dict)
    #: Commands run and skipped, in order, for the test to inspect.
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def run(self) -> Stage:
        """Every stage in order; returns the last (the image), kept as :attr:`run_stage`."""
        args: dict[str, str] = {}
        stages: dict[str, Stage] = {}
        stage: Stage | None = None
        for keyword, rest in parse_instructions(self.dockerfile.read_text()):
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                args[name] = self.build_args.get(name, default or args.get(name, ""))
            elif keyword == "FROM":
                words = rest.split()
                named = len(words) == 3 and words[1].upper() == "AS"
                name = words[2] if named else str(len(stages))
                stage = Stage(name, self.scratch / f"stage-{len(stages)}")
                stage.env["PATH"] = str(self._system_python(stage.root).parent)
                stages[name] = stage
            elif keyword == "ENV":
                assert stage is not None
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    stage.env[key] = self._expand(value, args, stage)
            elif keyword == "WORKDIR":
                stage.workdir = self._expand(rest, args, stage)
                self._host(stage, stage.workdir).mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self._copy(stage, stages, self._expand(rest, args, stage))
            elif keyword == "RUN":
                for command in self._expand(rest, args, stage).split(" && "):
                    self._run(stage, command.strip())
            elif keyword not in ("USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"):
                raise ValueError(f"{keyword} is not simulated")
        assert stage is not None
        self._final = stage
        return stage

    def entrypoint(self, extra: list[str]) -> subprocess.CompletedProcess:
        """Run the last stage's ENTRYPOINT (exec form) with ``extra`` arguments."""
        final = self.run_stage
        text = self.dockerfile.read_text()
        line = [line for line in text.splitlines() if line.startswith("ENTRYPOINT ")][-1]
        command = [*eval(line.split(" ", 1)[1]), *extra]  # a JSON array of strings
        return self._exec(final, command, check=False)

    # ---- helpers ----

    def _system_python(self, root: Path) -> Path:
        """A fresh virtual environment standing for the base image's ``python3``."""
        home = root / "base-python"
        if not home.exists():
            shutil.copytree(_base_python_template(), home, symlinks=True)
        return home / "bin" / "python"

    def _expand(self, text: str, args: dict[str, str], stage: Stage | None) -> str:
        values = {**args, **(stage.env if stage else {})}
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text
        )

    def _host(self, stage: Stage, container_path: str) -> Path:
        path = container_path
        if not path.startswith("/"):
            path = f"{stage.workdir}/{path}"
        return stage.root / "fs" / path.lstrip("/")

    def _copy(self, stage: Stage, stages: dict[str, Stage], rest: str) -> None:
        words = rest.split()
        source_stage = None
        if words[0].startswith("--from="):
            source_stage = stages[words.pop(0).split("=", 1)[1]]
        *sources, dest = words
        for source in sources:
            origin = self._host(source_stage, source) if source_stage else self.context / source
            target = self._host(stage, dest)
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True)
            else:
                target_file = target / origin.name if dest.endswith("/") else target
                target_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target_file)

    def _map_paths(self, stage: Stage, command: str) -> str:
        """Container paths (absolute, under folders the build created) to scratch paths."""
        fs = stage.root / "fs"
        roots = {p.name for p in fs.iterdir()} if fs.exists() else set()
        roots |= {"opt", "wheels", "src", "build"}
        return re.sub(
            r"(?<![\w.])/(" + "|".join(sorted(map(re.escape, roots))) + r")\b",
            lambda m: str(stage.root / "fs" / m.group(1)),
            command,
        )

    def _run(self, stage: Stage, command: str) -> None:
        words = shlex.split(command)
        if not words or os.path.basename(words[0].lstrip("(")) not in ("python", "python3"):
            self.skipped.append(command)
            return
        self.ran.append(command)
        mapped = self._map_paths(stage, command)
        env_path = self._map_paths(stage, stage.env.get("PATH", ""))
        self._exec(stage, ["bash", "-c", mapped], check=True, path=env_path)

    def _exec(self, stage, command, check, path=None) -> subprocess.CompletedProcess:
        env = {k: self._map_paths(stage, v) for k, v in stage.env.items()}
        env["PATH"] = path or self._map_paths(stage, stage.env.get("PATH", ""))
        # Keep the base interpreter last on PATH, as python3 is on an image's PATH.
        env["PATH"] += os.pathsep + str(self._system_python(stage.root).parent)
        env["PATH"] += os.pathsep + "/usr/bin:/bin"
        for key in ("HOME", "TMPDIR", "PIP_FIND_LINKS", "PIP_CERT", "SSL_CERT_FILE"):
            if key in os.environ and key not in stage.env:
                env[key] = os.environ[key]
        env.setdefault("HOME", str(stage.root / "home"))
        cwd = self._host(stage, stage.workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        if command[0] in ("python", "python3", "metroline"):
            resolved = shutil.which(command[0], path=env["PATH"])
            command = [resolved or command[0], *command[1:]]
        return subprocess.run(
            command, cwd=cwd, env=env, check=check, capture_output=True, text=True, timeout=900
        )

    @property
    def run_stage(self) -> Stage:
        if not hasattr(self, "_final"):
            self._final = self.run()
        return self._final


_TEMPLATE_LOCK = threading.Lock()
_template: Path | None = None


def _base_python_template() -> Path:
    """One virtual environment with pip, made once per process; stages get copies of it."""
    global _template
    with _TEMPLATE_LOCK:
        if _template is None:
            scratch = tempfile.mkdtemp(prefix="base-python-")
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
            home = Path(scratch) / "venv"
            venv.EnvBuilder(with_pip=True, symlinks=True).create(home)
            _template = home
        return _template


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"

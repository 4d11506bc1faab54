"""README.md's code blocks run as written (issue 24): every fenced ```bash and ```python block, in order, in one
temporary folder, with free ports substituted for the ones it names. A block is skipped only when it is marked
``<!-- readme-test: skip (why) -->`` (installs, the whole suite, the network); fences without a language are
synopses and are not run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"^<!-- readme-test: skip \((?P<why>[^)]+)\) -->$")
PORTS = re.compile(r"\b876[5-9]\b")  # the ports the README names
RUN = {"bash", "python"}
ALLOWED_SKIPS = 3  # pip install, the test suite, the Hub: growing this list needs a reason


def readme_blocks(text: str) -> list[tuple[str, str, str | None, int]]:
    """(language, body, why skipped or None, line) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start, body = lines[i][3:].strip(), i, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            m = SKIP.match(prev.strip())
            blocks.append((lang, "\n".join(body) + "\n", m["why"] if m else None, start + 1))
        i += 1
    return blocks


def test_readme_blocks_are_found_and_skips_are_few() -> None:
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if b[0] in RUN]
    assert len(runnable) >= 8
    assert len([b for b in runnable if b[2] is not None]) <= ALLOWED_SKIPS
    assert all(not PORTS.search(b[1]) or "PORT=" in b[1] or b[0] == "python" for b in runnable)


@pytest.mark.slow
def test_every_readme_block_runs_as_written(tmp_path: Path) -> None:
    ports: dict[str, str] = {}

    def port(m: re.Match) -> str:
        return ports.setdefault(m.group(0), str(free_port()))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    groups: list[int] = []
    try:
        for lang, body, why, line in readme_blocks(README.read_text()):
            if lang not in RUN or why is not None:
                continue
            code = PORTS.sub(port, body)
            cmd = ["bash", "-e", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            groups.append(proc.pid)  # its background servers share its process group
            out, err = proc.communicate(timeout=1200)
            assert proc.returncode == 0, f"README.md line {line} ({lang}) exited {proc.returncode}:\n{err[-3000:]}\n{out[-1000:]}"
    finally:
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


def test_docs_examples_and_benchmarks_import_no_moved_module_path() -> None:
    """Code a user copies imports the new paths (an old one warns, and goes away in the next release)."""
    from craft_sdk._deprecation import MOVED

    root = README.parent
    files = [README, *sorted((root / "docs").glob("*.md")), *sorted((root / "examples").glob("*.py")),
             *sorted((root / "benchmarks").glob("*.py"))]
    pats = []
    for old in MOVED:
        parent, _, leaf = old.rpartition(".")
        pats.append(re.compile(rf"^\s*(import|from)\s+{re.escape(old)}\b|^\s*from\s+{re.escape(parent)}\s+import\s+.*\b{leaf}\b",
                               re.M))
    hits = [f"{f.relative_to(root)}: {m.group(0).strip()}" for f in files for p in pats for m in p.finditer(f.read_text())]
    assert not hits, hits

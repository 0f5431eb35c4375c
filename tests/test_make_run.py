"""The README's first steps, as a new user follows them: `make run` sets up the demo (``python -m daemon.demo
config.example.yaml``) and serves it, then the README's curl line gets the answer the README shows, setosa.

The only change to what `make run` does is the port: 0 instead of 8080, so the test never collides with anything.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from daemon.demo import LABELS

README_URL = "http://127.0.0.1:8080"


def one_line(command: str) -> str:
    return " ".join(part.rstrip("\\").strip() for part in command.splitlines())


def readme_curl() -> tuple[str, str]:
    """The curl command (as written, with its continuation lines) and the answer line of the README's block after
    "`make run` prints a ready `curl` line"."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"`make run` prints a ready `curl` line[^\n]*\n\n```\n(.*?)```", text, re.S)
    assert match, "the README's `make run` curl block is gone"
    lines = match.group(1).splitlines()
    command, answer = [], None
    for line in lines:
        if answer is None and (not command or command[-1].endswith("\\")):
            command.append(line)
        else:
            answer = line
    assert answer is not None and command[0].startswith("curl "), lines
    return "\n".join(command), answer


def makefile_curl() -> str:
    """The curl line `make run` echoes, as the shell prints it."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    run = text[text.index("\nrun:"):]
    echoed = [line.strip()[len('@echo "'):-1] for line in run.splitlines()
              if line.strip().startswith('@echo "  ') and ("curl" in line or "-d " in line)]
    return "\n".join(e.replace('\\"', '"').replace("\\\\", "\\") for e in echoed)


def test_make_run_prints_the_readmes_curl_line() -> None:
    assert one_line(makefile_curl()) == one_line(readme_curl()[0])


def test_the_readmes_curl_line_answers_setosa(tmp_path: Path, start_daemon) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: the README's first request uses it (apt-get install curl)")
    config = tmp_path / "config.example.yaml"
    text = (REPO / "config.example.yaml").read_text(encoding="utf-8")
    text, replaced = re.subn(r"(?m)^(  port: )8080\b", r"\g<1>0", text, count=1)
    assert replaced == 1
    config.write_text(text, encoding="utf-8")
    setup = subprocess.run([sys.executable, "-m", "daemon.demo", str(config)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)  # `make run`'s first step
    assert setup.returncode == 0, setup.stderr
    daemon = start_daemon(config)  # and its second: inferd serve --config config.example.yaml

    command, shown = readme_curl()
    assert README_URL in command
    # the README's lines as a user pastes them, backslash-newline continuation included
    res = subprocess.run(["bash", "-c", command.replace(README_URL, daemon.url)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    expected = json.loads(shown.replace("[...]", "[]"))  # the README elides the probabilities
    assert {k: v for k, v in got.items() if k != "outputs"} == {k: v for k, v in expected.items() if k != "outputs"}
    (out,) = got["outputs"]
    assert {k: v for k, v in out.items() if k != "data"} == {k: v for k, v in expected["outputs"][0].items()
                                                            if k != "data"}
    probabilities = np.array(out["data"], np.float32).reshape(out["shape"])
    assert LABELS[int(probabilities.argmax())] == "setosa"
    np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-5)
    assert daemon.stop() == 0

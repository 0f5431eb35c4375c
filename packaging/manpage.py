"""Write inferd(1) in roff from the command's own argparse parser, so the man page never drifts from ``--help``.

Run with the interpreter of the venv being packaged (packaging/build-deb.sh does): it imports the installed inferd.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from daemon import __version__
from daemon.cli import _parser


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


def _escape(text: str) -> str:
    lines = text.replace("\\", "\\e").splitlines()
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in lines)


def render() -> str:
    top = _parser()
    out = [
        f'.TH INFERD 1 "" "inferd {__version__}" "User Commands"',
        ".SH NAME",
        "inferd \\- model-serving daemon for encrypted models (KServe V2 over HTTP, gRPC and MQTT)",
        ".SH SYNOPSIS",
        ".B inferd",
        "[\\-\\-debug] COMMAND ...",
        ".SH DESCRIPTION",
        "Each command below is shown with its own \\fB\\-\\-help\\fR text.",
        "The service runs \\fBinferd serve \\-\\-config /etc/inferd/inferd.yaml\\fR under systemd (inferd.service).",
        "Operating it: /usr/share/doc/inferd/docs/operations.md.",
        ".SH OPTIONS",
        ".nf",
        _escape(top.format_help()),
        ".fi",
        ".SH COMMANDS",
    ]
    for name, sub in _commands(top, "inferd"):
        out += [".SS " + name.replace("-", "\\-"), ".nf", _escape(sub.format_help()), ".fi"]
    out += [
        ".SH FILES",
        ".TP", "/etc/inferd/inferd.yaml", "the service's configuration",
        ".TP", "/etc/inferd/keys", "key files the unit passes to the service as credentials",
        ".TP", "/var/lib/inferd", "the model store",
        ".SH SEE ALSO",
        "systemctl(1), journalctl(1), /usr/share/doc/inferd/README.md",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())

"""Run a command under a seccomp filter like the unit's ``SystemCallFilter=~@privileged @resources``, through
libseccomp (the library systemd itself uses) by ctypes, so a test can start the daemon as the service would be
sandboxed, without a running systemd.

Usage (as a wrapper before the command, which it execs): python tests/support/seccomp.py eperm|kill SYSCALL... -- CMD
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0x0000FFFF)


def main() -> None:
    action, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    names, cmd = rest[:split], rest[split + 1 :]
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    deny = scmp_act_errno(errno.EPERM) if action == "eperm" else SCMP_ACT_KILL_PROCESS
    for name in names:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # a name this kernel's table lacks cannot be called anyway
            assert lib.seccomp_rule_add(ctx, deny, number, 0) == 0, name
    assert lib.seccomp_load(ctx) == 0, "seccomp_load failed"
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()

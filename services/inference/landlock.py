"""Landlock (Linux >= 5.13) through its three system calls: confine this thread and its future children.

A ruleset handles every access right the running kernel knows (so all of them are denied unless a
rule grants them), TCP bind/connect from ABI 4 and signal / abstract-socket scoping from ABI 6.
Rules grant rights beneath an open directory or on one file. Nothing here decides which paths: see
`sandbox`.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Filesystem rights (include/uapi/linux/landlock.h).
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the rights a rule on a file may carry
_ABI1_FS = (1 << 13) - 1  # execute .. make_sym
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or a seccomp filter hides it)."""
    if sys.platform != "linux":
        return 0
    version = _libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))  # fmt: skip
    return max(0, int(version))


def unavailable_reason() -> str:
    """Why `abi()` is 0, for the operator."""
    if sys.platform != "linux":
        return f"Landlock needs Linux, this is {sys.platform}"
    _libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                  ctypes.c_uint32(_CREATE_RULESET_VERSION))  # fmt: skip
    code = ctypes.get_errno()
    why = os.strerror(code) if code else "not supported"
    return f"Landlock unavailable ({why}): needs Linux >= 5.13 with landlock in the lsm= list, and a seccomp " \
           "profile that allows its system calls"


def handled_fs(version: int) -> int:
    rights = _ABI1_FS
    if version >= 2:
        rights |= REFER
    if version >= 3:
        rights |= TRUNCATE
    if version >= 5:
        rights |= IOCTL_DEV
    return rights


def restrict_self(rules: dict[int, int], version: int) -> None:
    """Deny everything but `rules` ({O_PATH fd: rights}) from now on; OSError naming the failing call."""
    handled = handled_fs(version)
    attr = _RulesetAttr(handled, _NET_BIND_TCP | _NET_CONNECT_TCP if version >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if version >= 6 else 0)  # fmt: skip
    size = 8 if version < 4 else 16 if version < 6 else 24  # the struct as this ABI knows it
    ruleset = _libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                            ctypes.c_uint32(0))  # fmt: skip
    if ruleset < 0:
        raise _error("landlock_create_ruleset")
    try:
        for fd, rights in rules.items():
            rule = _PathBeneathAttr(rights & handled, fd)
            if _libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                             ctypes.byref(rule), ctypes.c_uint32(0)) < 0:  # fmt: skip
                raise _error("landlock_add_rule")
        if _libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            raise _error("landlock_restrict_self")
    finally:
        os.close(ruleset)


def _error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")

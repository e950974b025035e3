"""Least privilege for a model worker, taken in the worker before it reads a byte of its artifact.

`apply(policy)` runs while the worker is still one thread (before numpy, torch or onnxruntime are
imported) and takes, as far as this host allows:

- limits: no core dumps, `open_files` descriptors, an address-space cap, no file growth when the
  worker's stdout/stderr are not regular files, a process cap once it runs as its own user;
- network: a new network namespace (only an unconfigured loopback), by `unshare(CLONE_NEWNET)` as
  root or inside a new user namespace otherwise;
- user: from root to an unprivileged uid/gid (no supplementary groups, no capabilities left);
- no_new_privs, then Landlock (see `landlock`): read-only access to the Python runtime, system libraries, a few
  /proc, /sys and /dev entries and the worker's own artifact; no write, create, remove or execute
  anywhere; no TCP bind or connect; no signals or abstract Unix sockets outside the sandbox.

What cannot be taken is reported with the reason (`SandboxReport.missing`): mode "auto" serves on
without it, "require" refuses to start a worker that lacks an essential measure.
`python -m services.inference.sandbox` applies a policy to itself and prints what held.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import importlib.util
import os
import pwd
import resource
import site
import socket
import stat
import sys
import sysconfig
from collections.abc import Iterable
from typing import Any

from services.inference import landlock

MODES = ("auto", "require", "off")
# Without these a worker is not considered sandboxed under mode "require".
ESSENTIAL = ("network", "user", "filesystem", "no_new_privs", "core_dumps", "open_files")
# A CPU worker's address-space allowance besides its artifact: torch alone maps ~0.9 GiB.
DEFAULT_ADDRESS_SPACE_MB = 8192
# Shared by every worker running as the sandbox user: bounds a fork or thread bomb, not a model.
PROCESS_LIMIT = 4096

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
# machine: (AUDIT_ARCH_*, __NR_socket); io_uring_setup is 425 everywhere (io_uring can open sockets).
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
_NR_IO_URING_SETUP = 425
_READ = landlock.READ_FILE | landlock.READ_DIR
_DEVICE = landlock.READ_FILE | landlock.WRITE_FILE | landlock.TRUNCATE | landlock.IOCTL_DEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclasses.dataclass(frozen=True)
class SandboxPolicy:
    """What a worker may keep. Plain values only: it crosses the pipe before anything is imported."""

    mode: str = "auto"
    uid: int = 65534  # the user a root service's workers run as
    gid: int = 65534
    open_files: int = 256
    address_space_bytes: int = DEFAULT_ADDRESS_SPACE_MB * 2**20  # 0: no cap
    readable: tuple[str, ...] = ()  # besides the runtime: the worker's artifact (file or directory), read-only
    device: str = "cpu"


@dataclasses.dataclass
class SandboxReport:
    """Which measures hold (with a detail) and which do not (with the reason)."""

    mode: str
    applied: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: dict[str, str] = dataclasses.field(default_factory=dict)
    # Where the worker opens each readable path now (/proc/self/fd/N when only a descriptor opened
    # before the user change still reaches it).
    paths: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def missing_essential(self) -> dict[str, str]:
        return {k: v for k, v in self.missing.items() if k in ESSENTIAL}

    def summary(self) -> str:
        held = "; ".join(f"{k}: {v}" for k, v in self.applied.items()) or "nothing"
        lacking = "; ".join(f"{k}: {v}" for k, v in self.missing.items())
        return f"sandbox {self.mode}: {held}" + (f"; NOT applied: {lacking}" if lacking else "")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> SandboxReport:
        """Back from `as_dict`, as a worker sent it: strings only, or TypeError."""
        if not isinstance(data, dict) or not isinstance(data.get("mode"), str):
            raise TypeError("not a sandbox report")
        fields = {}
        for key in ("applied", "missing", "paths"):
            value = data.get(key, {})
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()):  # fmt: skip
                raise TypeError(f"sandbox report field {key} is not a map of strings")
            fields[key] = {k[:200]: v[:1000] for k, v in value.items()}
        return cls(data["mode"][:20], **fields)


class SandboxRefused(Exception):
    """Mode "require" and an essential measure could not be taken."""


def resolve_user(spec: str) -> tuple[int, int]:
    """'nobody', 'name', 'uid' or 'uid:gid' to (uid, gid); a missing 'nobody' is 65534:65534."""
    spec = spec.strip()
    if not spec:
        raise ValueError("no user given")
    name, _, group = spec.partition(":")
    if name.isdigit():
        uid = int(name)
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    else:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if name != "nobody":
                raise ValueError(f"'{name}' is not a user on this host") from None
            uid = gid = 65534
        else:
            uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        if not group.isdigit():
            raise ValueError(f"the group after ':' must be a number, got '{group}'")
        gid = int(group)
    if uid == 0 or gid == 0:
        raise ValueError("workers must not run as root (uid or gid 0)")
    return uid, gid


def apply(policy: SandboxPolicy) -> SandboxReport:
    """Confine this process for good; raises SandboxRefused when mode is "require" and one fails."""
    report = SandboxReport(policy.mode)
    report.paths = {path: path for path in policy.readable}
    if policy.mode == "off":
        report.missing["all"] = "worker_sandbox is off"
        return report
    if sys.platform != "linux":
        report.missing.update(dict.fromkeys(ESSENTIAL, f"the sandbox needs Linux, this is {sys.platform}"))
        if policy.mode == "require":
            raise SandboxRefused(f"worker_sandbox=require but the sandbox needs Linux, this is {sys.platform}")
        return report
    threads = _thread_count()
    held = _open_readable(policy.readable, report)
    rule_fds = _open_rule_paths(_rule_paths(policy))
    # Namespaces, no_new_privs and Landlock bind the calling thread only: they need a lone thread.
    alone = threads == 1
    try:
        _limit(policy, report)
        if alone and os.geteuid() == 0:
            _unshare_network(_CLONE_NEWNET, report)
        _drop_user(policy, held, report)
        if alone and "network" not in report.applied:
            _unshare_network(_CLONE_NEWUSER | _CLONE_NEWNET, report)
        if alone:
            if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
                report.applied["no_new_privs"] = "set"
            else:
                report.missing["no_new_privs"] = os.strerror(ctypes.get_errno())
            if policy.device == "cpu":
                _deny_sockets(report)
            else:
                report.missing["sockets"] = f"not filtered on {policy.device} (GPU drivers may use Unix sockets)"
            _landlock(rule_fds, report)
        else:
            why = f"{threads} threads were already running; only the calling one would be confined"
            for measure in ("network", "no_new_privs", "filesystem"):
                report.missing[measure] = why
        _choose_paths(held, report)
    finally:
        for fd in rule_fds:
            os.close(fd)
    if "network" not in report.applied and ("sockets" in report.applied or "tcp" in report.applied):
        held_by = "no new sockets (seccomp)" if "sockets" in report.applied else "TCP only (Landlock)"
        report.applied["network"] = f"{held_by}; " + report.missing.pop("network", "no network namespace")
    if policy.mode == "require" and report.missing_essential:
        lacking = "; ".join(f"{k}: {v}" for k, v in report.missing_essential.items())
        raise SandboxRefused(f"worker_sandbox=require but the worker could not be confined ({lacking})")
    return report


# --- limits, network, user ------------------------------------------------------------------------


def _set_limit(report: SandboxReport, measure: str, which: int, value: int, detail: str) -> None:
    try:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and hard < value:
            value = hard
        resource.setrlimit(which, (value, value))
    except (OSError, ValueError) as exc:
        report.missing[measure] = str(exc)
    else:
        report.applied[measure] = detail.format(value=value)


def _limit(policy: SandboxPolicy, report: SandboxReport) -> None:
    _set_limit(report, "core_dumps", resource.RLIMIT_CORE, 0, "none")
    _set_limit(report, "open_files", resource.RLIMIT_NOFILE, max(32, policy.open_files), "{value}")
    if policy.address_space_bytes <= 0:
        report.missing["address_space"] = "no cap (worker_address_space_mb is 0)"
    elif policy.device != "cpu":
        report.missing["address_space"] = f"not capped on {policy.device}: the GPU driver reserves far more"
    else:
        _set_limit(report, "address_space", resource.RLIMIT_AS, policy.address_space_bytes,
                   f"{policy.address_space_bytes / 2**30:.1f} GiB")  # fmt: skip
    logs = [fd for fd in (1, 2) if _is_regular(fd)]
    if logs:
        report.missing["file_size"] = f"fd {logs[0]} is a regular file (the service's log); writes stay open"
    else:
        _set_limit(report, "file_size", resource.RLIMIT_FSIZE, 0, "0")


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _unshare_network(flags: int, report: SandboxReport) -> None:
    if _libc.unshare(flags) != 0:
        why = f"unshare: {os.strerror(ctypes.get_errno())}"
        report.missing["network"] = f"{report.missing['network']}; {why}" if "network" in report.missing else why
        return
    report.missing.pop("network", None)
    if flags & _CLONE_NEWUSER:
        # The new user namespace grants every capability inside it; keep none.
        if not _capset_none():
            report.missing["capabilities"] = "capabilities inside the new user namespace were not dropped"
        report.applied["network"] = "new network namespace (in a new user namespace)"
    else:
        report.applied["network"] = "new network namespace"


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _deny_sockets(report: SandboxReport) -> None:
    """seccomp: socket(2) and io_uring_setup(2) fail with EPERM; a foreign syscall ABI kills the process.

    The worker's pipe to the service exists already; it never needs another socket. This is what
    keeps UDP, raw, netlink and Unix sockets out of reach where no network namespace could be made.
    """
    arch = _SECCOMP_ARCH.get(os.uname().machine)
    if arch is None:
        report.missing["sockets"] = f"no seccomp filter for {os.uname().machine}"
        return
    audit_arch, nr_socket = arch
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    deny, allow, kill = 0x00050000 | errno.EPERM, 0x7FFF0000, 0x80000000
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, 6, audit_arch),
        (load, 0, 0, 0),  # seccomp_data.nr
        (jge, 4, 0, 0x40000000),  # x32 system calls
        (jeq, 1, 0, nr_socket),
        (jeq, 0, 1, _NR_IO_URING_SETUP),
        (ret, 0, 0, deny),
        (ret, 0, 0, allow),
        (ret, 0, 0, kill),
    ]
    filters = (_SockFilter * len(program))(*(_SockFilter(*step) for step in program))
    fprog = _SockFprog(len(program), filters)
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        report.missing["sockets"] = f"seccomp: {os.strerror(ctypes.get_errno())}"
    else:
        report.applied["sockets"] = "no new sockets (seccomp)"


def _drop_user(policy: SandboxPolicy, held: dict[str, int], report: SandboxReport) -> None:
    if os.geteuid() != 0:
        report.applied["user"] = f"uid {os.geteuid()} (the service is not root)"
        return
    reason = ""
    for path, fd in held.items():
        info = os.fstat(fd)
        if not _permits(info, policy.uid, policy.gid, 4):
            reason = (f"{path} (mode {stat.S_IMODE(info.st_mode):o}, owner {info.st_uid}) is unreadable to uid "
                      f"{policy.uid}; make the model cache readable (umask 022) to run workers unprivileged")
    if not reason:
        _reroute_imports(policy.uid, policy.gid)
        try:
            os.setgroups([])
            os.setresgid(policy.gid, policy.gid, policy.gid)
            os.setresuid(policy.uid, policy.uid, policy.uid)
        except OSError as exc:
            reason = f"cannot change user: {exc.strerror}"
    if reason:
        left = "without capabilities" if _drop_capabilities() else "WITH its capabilities"
        report.missing["user"] = f"stays uid 0 {left}: {reason}"
        return
    try:
        os.setuid(0)
    except PermissionError:
        report.applied["user"] = f"uid {policy.uid} gid {policy.gid}, no groups or capabilities"
    else:  # pragma: no cover - would mean the drop did not hold
        raise SandboxRefused("dropped to an unprivileged user but could become root again")
    _set_limit(report, "processes", resource.RLIMIT_NPROC, PROCESS_LIMIT, "{value} for uid " + str(policy.uid))


def _permits(info: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    """Whether the mode grants `bit` (4 read, 1 search) to uid/gid, as the kernel checks it."""
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == uid:
        return bool(mode & (bit << 6))
    if info.st_gid == gid:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


def _reachable(path: str, uid: int, gid: int) -> bool:
    """Whether uid can walk to `path` (every directory on the way searchable)."""
    current = os.path.abspath(path)
    while True:
        parent = os.path.dirname(current)
        try:
            if not _permits(os.stat(parent), uid, gid, 1):
                return False
        except OSError:
            return False
        if parent == current:
            return True
        current = parent


def _reroute_imports(uid: int, gid: int) -> None:
    """Keep Python's lazy imports working when the runtime sits under a directory uid cannot enter.

    CI and dev machines often keep Python under /root (pyenv). A directory opened now, as root, is
    reached later through /proc/self/fd/N without walking the closed parents; Landlock still
    judges the real files.
    """
    entries = [p for p in dict.fromkeys(sys.path) if p and os.path.isdir(p) and not _reachable(p, uid, gid)]
    routes: dict[str, str] = {}
    for entry in sorted(entries, key=len, reverse=True):
        fd = os.open(entry, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        routes[entry] = f"/proc/self/fd/{fd}"
    if not routes:
        return

    def rerouted(path: str) -> str:
        for entry, route in routes.items():
            if path == entry or path.startswith(entry + os.sep):
                return route + path[len(entry):]
        return path

    sys.path[:] = [rerouted(p) for p in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if type(search) is list:
            search[:] = [rerouted(p) for p in search]
    sys.path_importer_cache.clear()


def _drop_capabilities() -> bool:
    """For a worker that must stay uid 0: no capabilities now, none regained through exec."""
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            return False
    return _capset_none()


def _capset_none() -> bool:
    number = _SYS_CAPSET.get(os.uname().machine)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    return number is not None and _libc.syscall(ctypes.c_long(number), header, data) == 0


def _open_readable(paths: Iterable[str], report: SandboxReport) -> dict[str, int]:
    """Descriptors opened while every directory on the way is still reachable."""
    held = {}
    for path in paths:
        try:
            held[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            report.missing[f"read {path}"] = exc.strerror or str(exc)
    return held


def _choose_paths(held: dict[str, int], report: SandboxReport) -> None:
    """The plain path when it still opens; else the descriptor; unneeded descriptors are closed."""
    for path, fd in held.items():
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            report.paths[path] = f"/proc/self/fd/{fd}"
        else:
            os.close(fd)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


# --- Landlock ------------------------------------------------------------------------------------


def _rule_paths(policy: SandboxPolicy) -> dict[str, int]:
    """Every path the worker may open after the sandbox, and with which rights."""
    rules: dict[str, int] = {}
    read_roots = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                  *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")),
                  *site.getsitepackages(), "/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache",
                  "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/proc/self", "/proc/cpuinfo",
                  "/proc/meminfo", "/proc/stat", "/sys/devices", "/sys/bus/pci", "/sys/fs/cgroup",
                  "/dev/urandom", "/dev/random", "/dev/zero"}  # fmt: skip
    if site.ENABLE_USER_SITE:
        read_roots.add(site.getusersitepackages())
    for package in ("services", "aiaas"):
        spec = importlib.util.find_spec(package)
        if spec is not None:
            read_roots.update(spec.submodule_search_locations or [])
    read_roots.update(p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p)
    for path in read_roots:
        if path:
            rules[path] = rules.get(path, 0) | _READ
    rules["/dev/null"] = _DEVICE
    if policy.device != "cpu":
        for name in os.listdir("/dev"):
            if name.startswith(("nvidia", "dri")):
                rules[f"/dev/{name}"] = _DEVICE
        for path in ("/proc/driver", "/sys"):
            rules[path] = rules.get(path, 0) | _READ
    for path in policy.readable:
        # The artifact (a file, or a checkpoint directory and what is in it): read, never execute or write.
        rules[path] = _READ if os.path.isdir(path) else landlock.READ_FILE
    return rules


def _open_rule_paths(rules: dict[str, int]) -> dict[int, int]:
    """{fd: rights} for the paths that exist, opened before the user change can hide them."""
    opened: dict[int, int] = {}
    for path, rights in rules.items():
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= landlock.FILE_RIGHTS
        opened[fd] = rights
    return opened


def _landlock(rule_fds: dict[int, int], report: SandboxReport) -> None:
    version = landlock.abi()
    if version < 1:
        report.missing["filesystem"] = landlock.unavailable_reason()
        report.missing["tcp"] = report.missing["scope"] = "Landlock unavailable"
        return
    try:
        landlock.restrict_self(rule_fds, version)
    except OSError as exc:
        report.missing["filesystem"] = exc.strerror or str(exc)
        return
    report.applied["filesystem"] = f"Landlock ABI {version}: read-only runtime and artifact, no writes or exec"
    if version >= 4:
        report.applied["tcp"] = "no TCP bind or connect (Landlock)"
    else:
        report.missing["tcp"] = f"Landlock ABI {version} < 4 cannot restrict TCP"
    if version >= 6:
        report.applied["scope"] = "no signals or abstract Unix sockets outside the sandbox"
    else:
        report.missing["scope"] = f"Landlock ABI {version} < 6 cannot scope signals"


# --- a diagnostic: apply a policy here and show what held ----------------------------------------------


def probe(policy: SandboxPolicy, *, connect: str = "", connect_unix: str = "", reads: Iterable[str] = (),
          write_dir: str = "", signal_pid: int = 0) -> dict[str, Any]:  # fmt: skip
    """Apply `policy` to this process, then try what a hostile model would; the results as a dict."""
    try:
        report = apply(policy)
    except SandboxRefused as exc:
        return {"refused": str(exc)}
    result: dict[str, Any] = {"report": report.as_dict(), "euid": os.geteuid(), "egid": os.getegid(),
                              "groups": os.getgroups(), "limits": {}, "reads": {}}  # fmt: skip
    for name in ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC"):
        result["limits"][name] = resource.getrlimit(getattr(resource, name))[0]
    with open("/proc/self/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    result["no_new_privs"] = fields.get("NoNewPrivs", "").strip()
    result["cap_eff"] = fields.get("CapEff", "").strip()
    result["netns"] = os.readlink("/proc/self/ns/net")
    if connect:
        host, _, port = connect.rpartition(":")
        result["connect"] = _attempt(lambda: socket.create_connection((host, int(port)), timeout=2).close())

        def send_udp() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(b"probe", (host, int(port)))

        result["udp"] = _attempt(send_udp)
    if connect_unix:

        def connect_to_unix() -> None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(connect_unix)

        result["unix"] = _attempt(connect_to_unix)
    for path in reads:
        where = report.paths.get(path, path)
        result["reads"][path] = _attempt(lambda where=where: open(where, "rb").close())
    if write_dir:
        target = os.path.join(write_dir, f"sandbox-probe-{os.getpid()}")
        result["write"] = _attempt(lambda: open(target, "wb").close())
    import subprocess

    result["exec"] = _attempt(lambda: subprocess.run(["/bin/true"], check=True))
    if signal_pid:
        result["signal"] = _attempt(lambda: os.kill(signal_pid, 0))
    return result


def _attempt(action: Any) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Apply the model-worker sandbox to this process; print what held.")
    parser.add_argument("--mode", default="auto", choices=MODES)
    parser.add_argument("--user", default="nobody", help="user a root process drops to (name, uid or uid:gid)")
    parser.add_argument("--open-files", type=int, default=SandboxPolicy.open_files)
    parser.add_argument("--address-space-mb", type=int, default=DEFAULT_ADDRESS_SPACE_MB)
    parser.add_argument("--readable", action="append", default=[], help="a file the sandbox lets it read")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--connect", default="", help="HOST:PORT to try a TCP connection to")
    parser.add_argument("--connect-unix", default="", help="a Unix socket path to try to connect to")
    parser.add_argument("--read", action="append", default=[], help="a file to try to read")
    parser.add_argument("--write-dir", default="", help="a directory to try to create a file in")
    parser.add_argument("--signal-pid", type=int, default=0, help="a process to try to signal (signal 0)")
    args = parser.parse_args(argv)
    uid, gid = resolve_user(args.user)
    policy = SandboxPolicy(args.mode, uid, gid, args.open_files, args.address_space_mb * 2**20,
                           tuple(args.readable), args.device)  # fmt: skip
    result = probe(policy, connect=args.connect, connect_unix=args.connect_unix, reads=args.read + args.readable,
                   write_dir=args.write_dir, signal_pid=args.signal_pid)  # fmt: skip
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

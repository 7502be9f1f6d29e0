"""Launcher that runs one untrusted program for :mod:`fedcoder.sandbox`.

It is started once per program as ``python -I -S -B _sandbox_launcher.py ...``, so it is a
separate file that imports only cheap standard-library modules: everything imported here
is paid for by every program the evaluation runs.

Usage:
    run MODE WORKDIR [--limit NAME=VALUE]... [--expose DIR]... -- ARGV...
    sweep UID

``run`` executes ARGV in WORKDIR under the isolation MODE ("namespaces", "setuid" or
"plain", see fedcoder.sandbox) with the given ``resource.RLIMIT_<NAME>`` limits and exits
with the program's exit code, or 128 + N if signal N killed it. ``--expose`` names an
interpreter's install directory that must stay reachable for the throwaway uid even if it
lives under a private directory such as /root. ``sweep`` kills every process of UID.
"""

import ctypes
import os
import resource
import stat
import sys

UID_BASE = 2_000_000_000  # throwaway uid = UID_BASE + launcher pid: unique, owns no files
LAUNCH_ERROR = 125  # exit status when the sandbox itself could not be set up
TMPFS_OPTIONS = "size=64m,mode=1777"

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_NO_NEW_PRIVS = 38
_MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data))
    _check(result, f"mount {target}")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, nosuid/nodev/noexec flags) of every mount in this namespace."""
    mounts = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            # The kernel escapes blanks and backslashes in paths as octal (\040).
            target = os.fsdecode(fields[4].decode("unicode_escape").encode("latin-1"))
            options = fields[5].decode().split(",")
            flags = sum(_MOUNT_OPTION_FLAGS.get(option, 0) for option in options)
            mounts.append((target, flags))
    return mounts


def _first_private_ancestor(path: str) -> str | None:
    """The outermost directory on the way to ``path`` that others may not traverse."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _expose(paths: list[str]) -> None:
    """Cover private directories (e.g. /root) with an empty tmpfs holding only ``paths``.

    The throwaway uid could not reach an interpreter installed under /root otherwise, and
    everything else in such directories (keys, tokens, caches) stays hidden.
    """
    exposed = [(path, _first_private_ancestor(path)) for path in paths]
    exposed = [(path, private) for path, private in exposed if private is not None]
    handles = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path, _ in exposed}
    for private in sorted({private for _, private in exposed}):
        _mount("tmpfs", private, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    for path, handle in handles.items():
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{handle}", path, None, MS_BIND)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(handle)
    for private in {private for _, private in exposed}:
        _mount(None, private, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _isolate_filesystem(workdir: str, expose: list[str]) -> None:
    """Make this mount namespace read-only except ``workdir`` and fresh tmpfs scratch dirs."""
    # Without this, the mounts below would propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Keep a handle on the work dir: covering /tmp with a tmpfs hides its path.
    workdir_handle = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    for target, flags in _mount_points():
        # MS_BIND makes this a per-mount change; a plain remount would turn the host's
        # filesystem read-only too.
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    _expose(expose)
    for scratch in ("/tmp", "/dev/shm"):
        if os.path.isdir(scratch):
            _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, TMPFS_OPTIONS)
    os.makedirs(workdir, exist_ok=True)
    _mount(f"/proc/self/fd/{workdir_handle}", workdir, None, MS_BIND)
    # A bind mount inherits read-only from its (now read-only) source mount.
    _mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.close(workdir_handle)
    # The old working directory still points into the read-only mount.
    os.chdir(workdir)


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)  # gid = uid: a group that owns nothing either
    os.setuid(uid)


def _user_task_count(uid: int) -> int:
    """Processes and threads of ``uid``: RLIMIT_NPROC counts all of them, not just ours."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except FileNotFoundError:
                continue
    return count


def _become_program(argv: list[str], limits: dict[str, int], uid: int | None) -> None:
    """In a forked child: apply limits, drop privileges and exec the program."""
    if uid is None and "NPROC" in limits and os.geteuid() != 0:
        # Same uid as the caller: leave room for the processes the user already runs.
        limits = {**limits, "NPROC": limits["NPROC"] + _user_task_count(os.getuid())}
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
    if uid is not None:
        _drop_privileges(uid)
    # Setuid binaries (su, sudo, mount) must not hand privileges back.
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    os.execv(argv[0], argv)


def _spawn(argv: list[str], limits: dict[str, int], uid: int | None) -> int:
    child = os.fork()
    if child == 0:
        try:
            _become_program(argv, limits, uid)
        except BaseException as error:  # a forked child must never return into our caller
            print(f"fedcoder sandbox: cannot start {argv[0]}: {error}", file=sys.stderr)
        os._exit(LAUNCH_ERROR)
    return child


def _exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code  # shell convention for "killed by signal"


def _run_as_init(argv: list[str], limits: dict[str, int], uid: int | None) -> int:
    """PID 1 of the new namespace: when it returns, the kernel kills every process left."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    program = _spawn(argv, limits, uid)
    while True:
        # Orphans are re-parented to PID 1, so reap everything until the program is done.
        pid, wait_status = os.wait()
        if pid == program:
            return _exit_code(wait_status)


def _run_in_namespaces(
    workdir: str, expose: list[str], argv: list[str], limits: dict[str, int], uid: int | None
) -> int:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
    _isolate_filesystem(workdir, expose)
    init = os.fork()  # the first child after unshare(CLONE_NEWPID) becomes its PID 1
    if init == 0:
        code = LAUNCH_ERROR
        try:
            code = _run_as_init(argv, limits, uid)
        except BaseException as error:  # a forked child must never return into our caller
            print(f"fedcoder sandbox: {error}", file=sys.stderr)
        os._exit(code)
    return _exit_code(os.waitpid(init, 0)[1])


def run(mode: str, workdir: str, expose: list[str], argv: list[str], limits: dict[str, int]) -> int:
    """Run ``argv`` sandboxed and return its exit code."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0o022)  # a compiled binary must stay executable for the run's own uid
    uid = UID_BASE + os.getpid() if mode in ("namespaces", "setuid") else None
    if uid is not None:
        os.chown(workdir, uid, uid)
    if mode == "namespaces":
        return _run_in_namespaces(workdir, expose, argv, limits, uid)
    program = _spawn(argv, limits, uid)
    return _exit_code(os.waitpid(program, 0)[1])


def sweep(uid: int) -> None:
    """Kill every process of ``uid``. kill(-1) is atomic with respect to fork."""
    # Imported here: they cost ~10 ms (enum), paid by every program if at the top.
    import contextlib
    import signal

    _drop_privileges(uid)
    with contextlib.suppress(ProcessLookupError):  # nothing left to kill
        os.kill(-1, signal.SIGKILL)


def _parse_run_arguments(args: list[str]) -> tuple[str, str, list[str], list[str], dict[str, int]]:
    mode, workdir, *rest = args
    split = rest.index("--")
    options, argv = rest[:split], rest[split + 1 :]
    limits: dict[str, int] = {}
    expose: list[str] = []
    for flag, value in zip(options[::2], options[1::2], strict=True):
        if flag == "--limit":
            name, number = value.split("=")
            limits[name] = int(number)
        elif flag == "--expose":
            expose.append(value)
        else:
            raise ValueError(f"unknown option {flag}")
    return mode, workdir, expose, argv, limits


def main(args: list[str]) -> int:
    try:
        if args[0] == "sweep":
            sweep(int(args[1]))
            return 0
        return run(*_parse_run_arguments(args[1:]))
    except Exception as error:  # any setup failure: tell the caller why
        print(f"fedcoder sandbox: {error}", file=sys.stderr)
        return LAUNCH_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

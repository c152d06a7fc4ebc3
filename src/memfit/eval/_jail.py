"""The sandbox's inside: set up the namespaces `unshare` made, then run one Python program under its limits.

Run as `python -I -S _jail.py CONFIG.json`, standard library only (memfit is not importable here, on purpose: the
isolated interpreter sees no site-packages). memfit.eval.sandbox writes the config and starts this, as the init
(pid 1) of a fresh pid namespace, inside fresh mount and network namespaces when sandboxed. What it does, in order:

1. read the program (its host directory is about to be covered);
2. mount a private, size-capped tmpfs on /tmp: the program's cwd, HOME and only writable place, gone with the
   namespace;
3. cover /run with an empty tmpfs (the user's runtime dir, D-Bus and other daemons' unix sockets live there: a
   unix socket on a read-only mount still accepts connections);
4. make the interpreter reachable for the unprivileged uid (a root-only ancestor such as /root is covered by an
   empty tmpfs holding a bind of the interpreter's prefix, so nothing else of it shows);
5. remount every mount read-only and nosuid, recursively (mount_setattr), then /tmp writable again;
6. fork the program: rlimits, no capabilities (bounding set dropped, no_new_privs), uid/gid nobody when we are
   real root, fds above 2 closed, cwd /tmp, a fixed environment; then exec `python -I -S -B /tmp/main.py`.

The init waits for the program and exits with its status (128 + signal when a signal killed it). When the init
exits, the kernel kills whatever else is left in the pid namespace: forks and daemons do not outlive it.
Exit 125 with a `memfit-sandbox:` line on stderr: the setup failed (the program did not run).
"""

import ctypes
import json
import os
import resource
import stat
import sys

SETUP_FAILED = 125
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 0x2, 0x4, 0x1000, 0x4000
MNT_DETACH = 0x2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (syscalls added since 5.1 share one table)
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {fstype or 'bind'} on {target}")


def umount(target):
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path, flags, attr_set=0, attr_clr=0):
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    _libc.syscall.restype = ctypes.c_long
    result = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                           ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(result, f"mount_setattr {path}")


def can_traverse(path, uid, gid):
    """Whether `uid` may search directory `path` (mode bits only: the uid has no capabilities)."""
    info = os.stat(path)
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def expose(path, uid, gid, stage):
    """Make `path` (a directory) reachable for uid when an ancestor is closed to it: cover the highest closed
    ancestor with an empty tmpfs and bind `path` back at its place inside it."""
    parts = path.strip("/").split("/")
    closed = None
    for depth in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        if not can_traverse(ancestor, uid, gid):
            closed = ancestor
            break
    if closed is None:
        return
    os.mkdir(stage)
    mount(path, stage, None, MS_BIND | MS_REC)
    mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.makedirs(path, mode=0o755, exist_ok=True)
    mount(stage, path, None, MS_BIND | MS_REC)
    umount(stage)
    os.rmdir(stage)


def setup_namespaces(config, program):
    uid, gid = config["uid"], config["gid"]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['tmp_bytes']},mode=1777")
    required = [os.path.realpath(path) for path in config["reachable"]]
    if os.path.isdir("/run") and not any(path == "/run" or path.startswith("/run/") for path in required):
        mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    if uid is not None:
        for path in required:
            expose(path, uid, gid, "/tmp/.memfit-stage")
    with open("/tmp/main.py", "wb") as handle:
        handle.write(program)
    os.chmod("/tmp/main.py", 0o644)
    mount_setattr("/", AT_RECURSIVE, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    mount_setattr("/tmp", 0, attr_clr=MOUNT_ATTR_RDONLY)


def drop_privileges(config):
    limits = config["limits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    # SIGXCPU at the soft limit (the program may report it), SIGKILL a second later.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            break  # past the last capability this kernel knows (EINVAL); without CAP_SETPCAP nothing to drop
    if config["uid"] is not None:
        os.setgroups([])
        os.setresgid(config["gid"], config["gid"], config["gid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])  # clears every capability
    else:
        header = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
        _check(_libc.capset(header, data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")


def main():
    with open(sys.argv[1]) as handle:
        config = json.load(handle)
    try:
        with open(config["program"], "rb") as handle:
            program = handle.read()
        if config["namespaces"]:
            setup_namespaces(config, program)
            workdir = "/tmp"
        else:
            workdir = config["workdir"]
        main_py = os.path.join(workdir, "main.py")
    except (SetupError, OSError) as error:
        sys.stderr.write(f"memfit-sandbox: setup failed: {error}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        try:
            os.chdir(workdir)
            os.umask(0o077)
            drop_privileges(config)
            os.closerange(3, 1 << 16)
            os.execve(config["python"], [config["python"], "-I", "-S", "-B", main_py], config["env"])
        except BaseException as error:  # noqa: BLE001 - whatever fails here, the program did not start
            os.write(2, f"memfit-sandbox: setup failed: {error}\n".encode())
        os._exit(SETUP_FAILED)
    while True:  # as pid 1 we also reap the program's orphans
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == child:
            break
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()

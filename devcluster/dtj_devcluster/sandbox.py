"""The container of the process runtime: one pod's process in a root of its own.

    unshare --mount --uts --propagation private -- python -m dtj_devcluster.sandbox SPEC

The node agent writes SPEC (JSON, see `nodeagent.sandbox_spec`) and starts
this module in fresh mount and UTS namespaces. It builds the pod's root on a
tmpfs, sets the pod's hostname, drops to the pod's user and execs the
container's command, so the process keeps the pid the agent watches:

- every top-level host directory is bind-mounted read-only-by-permissions as
  the "image" (the project's virtualenv lives there), except
- /etc: an overlay of the host's /etc whose upper layer holds the pod's own
  hosts, resolv.conf and hostname, written there by the agent (which
  rewrites hosts in place as peers come and go; nothing touches the host's /etc),
- /tmp and /run: private to the pod (an emptyDir the pod mounts at /tmp wins);
  /root and /home: empty (the host's home directories are not the image's),
- the pod's volumes at their mountPaths (ConfigMaps, tokens, emptyDirs ...),
- `image_paths` (the project checkout, its virtualenv and the Python it was
  made from) at their own paths, so the image is there even when it lives
  under /tmp or a home directory.

Only Linux and root (the agent runs as root) are supported: it is test
infrastructure, not a container runtime.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
# Not shared from the host: the pod gets its own (home directories stay private, as in
# a container; an image path below them is bound on its own).
PRIVATE_TOP = {"etc", "tmp", "run", "proc", "sys", "dev", "lost+found", "root", "home"}
_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source: str, target: Path, *, read_only: bool = False) -> None:
    """Bind `source` (file or directory) at `target`, creating the mount point."""
    if Path(source).is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    mount(source, str(target), None, MS_BIND | MS_REC, None)
    if read_only:
        mount(source, str(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)


def inside(root: Path, path: str, depth: int = 0) -> Path:
    """`path` as seen from `root`: symlinks resolve against `root`, never the host.

    (/var/run -> /run must lead to the pod's /run, not the host's.)
    """
    parts = Path(path).parts[1:]
    cur = root
    for i, part in enumerate(parts):
        nxt = cur / part
        if nxt.is_symlink() and depth < 40:
            target = os.readlink(nxt)
            base = "/" if target.startswith("/") else "/" + str(cur.relative_to(root))
            joined = os.path.normpath(os.path.join(base, target, *parts[i + 1 :]))
            return inside(root, joined, depth + 1)
        cur = nxt
    return cur


def build_root(spec: dict[str, Any]) -> Path:
    root = Path(spec["root"])
    root.mkdir(parents=True, exist_ok=True)
    mount("tmpfs", str(root), "tmpfs", 0, "mode=755")
    for top in sorted(os.listdir("/")):
        path = Path("/") / top
        if top in PRIVATE_TOP or not path.is_dir() or path.is_symlink():
            if path.is_symlink():
                (root / top).symlink_to(os.readlink(path))
            continue
        bind(str(path), root / top)
    for top in ("proc", "sys", "dev"):
        bind(f"/{top}", root / top)
    etc = Path(spec["etc"])
    (etc / "upper").mkdir(parents=True, exist_ok=True)
    (etc / "work").mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir()
    mount(
        "overlay",
        str(root / "etc"),
        "overlay",
        0,
        f"lowerdir=/etc,upperdir={etc / 'upper'},workdir={etc / 'work'}",
    )
    (root / "run").mkdir()
    mount("tmpfs", str(root / "run"), "tmpfs", 0, "mode=755")
    bind(spec["tmp"], root / "tmp")
    for path in spec["image_paths"]:
        if Path(path).parts[1] in PRIVATE_TOP:  # elsewhere it is visible already
            bind(path, inside(root, path))
    for m in sorted(spec["mounts"], key=lambda m: len(Path(m["path"]).parts)):
        bind(m["source"], inside(root, m["path"]), read_only=m["readOnly"])
    if spec["read_only_root"]:
        mount("tmpfs", str(root), "tmpfs", MS_REMOUNT | MS_RDONLY, "mode=755")
    return root


def enter(spec: dict[str, Any]) -> None:
    """Build the root, become the pod's user there and exec the command."""
    root = build_root(spec)
    socket.sethostname(spec["hostname"])
    os.chroot(root)
    os.chdir(spec["workdir"] or "/")
    user = spec["user"]
    if user is not None:
        os.setgroups(spec["groups"])
        os.setgid(user["gid"])
        os.setuid(user["uid"])
    if spec["no_new_privs"]:
        pr_set_no_new_privs = 38
        _libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0)
    argv, env = spec["argv"], spec["env"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"cannot start container command {argv[0]!r}: {e.strerror}", file=sys.stderr)
        raise SystemExit(127) from None


def main() -> None:
    enter(json.loads(Path(sys.argv[1]).read_text()))


if __name__ == "__main__":
    main()

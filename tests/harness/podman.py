"""A real writer of the CRI log format: Debian's podman with conmon (CRI-O's logger).

Rootful, everything under a temporary directory: ``--root/--runroot/--tmpdir``, the vfs
storage driver, cgroupfs, a file for events, ``runc`` (crun refuses this host's hybrid
cgroup layout: "cgroups in hybrid mode not supported"), no network, explicit ulimits (the
default ones need a capability root lacks here), and a busybox image imported from the
host's static busybox. ``--log-driver k8s-file --log-opt path=...`` makes conmon write
the CRI format where the test says; writing ``2 0 0`` to the container's ``ctl`` pipe makes
conmon reopen it, as CRI-O does after the kubelet renames the file.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

IMAGE = "localhost/forwarder-test/busybox:latest"
APPLETS = ("sh", "echo", "sleep", "head", "tr", "printf", "seq", "cat")


class Podman:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.argv = [
            "podman",
            "--root",
            str(base / "root"),
            "--runroot",
            str(base / "run"),
            "--tmpdir",
            str(base / "tmp"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            "runc",
        ]

    def __call__(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def import_busybox(self) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add("/bin/busybox", arcname="bin/busybox")
            for applet in APPLETS:
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type = tarfile.SYMTYPE
                info.linkname = "busybox"
                tar.addfile(info)
        path = self.base / "busybox.tar"
        path.write_bytes(buf.getvalue())
        self("import", str(path), IMAGE)

    def create(self, log_path: Path, script: str) -> str:
        """A container running ``sh -c script`` whose CRI log conmon writes to ``log_path``."""
        return self(
            "create",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--log-driver",
            "k8s-file",
            "--log-opt",
            f"path={log_path}",
            IMAGE,
            "sh",
            "-c",
            script,
        )

    def ctl(self, cid: str) -> Path:
        """conmon's control pipe of a container (``2 0 0``: reopen the log file)."""
        return self.base / "root" / "vfs-containers" / cid / "userdata" / "ctl"

    def reopen_log(self, cid: str) -> None:
        with self.ctl(cid).open("w") as pipe:
            pipe.write("2 0 0\n")


def podman_or_skip(base: Path) -> Podman:
    if shutil.which("podman") is None or shutil.which("conmon") is None:
        pytest.skip("podman and conmon are not installed (apt-get install podman conmon runc)")
    podman = Podman(base)
    podman.import_busybox()
    return podman

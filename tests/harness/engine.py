"""A real Docker engine for integration tests: ``$DOCKER_HOST`` if it answers, else a private one.

The private engine is a ``dockerd`` of its own (own socket, data-root, exec-root, no iptables,
no bridge, ``vfs`` storage) living in a short temporary directory under ``/tmp``, because a unix
socket path is limited to about 107 bytes. Images cannot be pulled here, so a busybox image is
imported from the host's static busybox (Debian's ``busybox-static``).

Nothing here sleeps for a fixed time: every wait polls with a deadline (``wait_until``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit

import pytest

from tests.harness.polling import wait_until

IMAGE = "forwarder-test/busybox:latest"
# Every container the harness starts carries this label, so leftovers can be found and removed.
TEST_LABEL = "forwarder-test"
BUSYBOX = Path("/bin/busybox")
# The applets the tests may rely on; every other applet busybox lists is linked as well.
REQUIRED_APPLETS = (
    "sh",
    "echo",
    "printf",
    "cat",
    "seq",
    "head",
    "yes",
    "tr",
    "sleep",
    "dd",
    "kill",
    "true",
    "false",
    "env",
    "wc",
    "usleep",
)
# A private engine's directory is /tmp/fwd-XXXX; its owner holds an flock on LOCK_NAME in it.
PRIVATE_DIR_PREFIX = "fwd-"
LOCK_NAME = "harness.lock"
DAEMON_START_TIMEOUT = 60.0
# dockerd stops running containers on SIGTERM; each gets its stop timeout (run() sets 1 s).
DAEMON_STOP_TIMEOUT = 60.0


class EngineError(RuntimeError):
    """The engine or the docker CLI did not do what the harness asked."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket (the Engine API's usual transport)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(host: str, timeout: float) -> http.client.HTTPConnection:
    url = urlsplit(host)
    if url.scheme == "unix":
        return _UnixHTTPConnection(url.path, timeout)
    if url.scheme in ("tcp", "http"):
        return http.client.HTTPConnection(url.hostname or "localhost", url.port or 2375, timeout)
    raise EngineError(f"unsupported DOCKER_HOST scheme {url.scheme!r} in {host!r}")


def api_request(
    host: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """One Engine API request; returns (status, body). Chunked bodies come back decoded."""
    conn = _connection(host, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def ping(host: str, timeout: float = 2.0) -> bool:
    """True if the engine at ``host`` answers ``GET /_ping`` with 200 OK."""
    try:
        status, body = api_request(host, "GET", "/_ping", timeout=timeout)
    except (OSError, http.client.HTTPException, EngineError):
        return False
    return status == 200 and body.strip() == b"OK"


class Engine:
    """A running Docker engine, with the few helpers integration tests need.

    Attributes: ``host`` (a ``DOCKER_HOST`` URL), ``env`` (``os.environ`` plus ``DOCKER_HOST``,
    for subprocesses such as the forwarder under test), ``image`` (the busybox test image),
    ``created`` (ids of the containers started through :meth:`run`).
    """

    def __init__(self, host: str, *, private_dir: Path | None = None) -> None:
        self.host = host
        self.image = IMAGE
        self.created: set[str] = set()
        self._dir = private_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[bytes] | None = None
        self._closed = False
        docker = shutil.which("docker")
        if docker is None:
            raise EngineError("the docker CLI is not on PATH (apt-get install docker.io)")
        self._docker = docker
        env = dict(os.environ)
        env["DOCKER_HOST"] = host
        env.pop("DOCKER_CONTEXT", None)
        env["DOCKER_CLI_HINTS"] = "false"
        if private_dir is not None:
            # Keep the CLI away from the user's ~/.docker (credential helpers, contexts).
            env["DOCKER_CONFIG"] = str(private_dir / "cli")
            env.pop("DOCKER_TLS_VERIFY", None)
            env.pop("DOCKER_CERT_PATH", None)
        self.env = env

    def __repr__(self) -> str:
        kind = "private" if self.is_private else "external"
        state = "running" if self.daemon_running else "stopped"
        return f"<Engine {kind} {self.host} {state} created={len(self.created)}>"

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_environment(cls) -> Engine:
        """``$DOCKER_HOST`` if it is set and answers, else a new private engine."""
        host = os.environ.get("DOCKER_HOST")
        if host:
            if ping(host):
                engine = cls(host)
                engine.ensure_image()
                return engine
            warnings.warn(
                f"DOCKER_HOST={host} does not answer /_ping; starting a private dockerd",
                stacklevel=2,
            )
        return cls.start_private()

    @classmethod
    def start_private(cls) -> Engine:
        """Start a private ``dockerd`` in a new temporary directory and wait until it answers."""
        if shutil.which("dockerd") is None:
            raise EngineError(
                "dockerd is not installed: run .ci/run, or apt-get install docker.io busybox-static"
            )
        reap_stale_private_dirs()
        directory = Path(tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIX, dir="/tmp"))
        engine = cls(f"unix://{directory / 'docker.sock'}", private_dir=directory)
        _LIVE_ENGINES.append(engine)
        try:
            engine._lock = _hold_lock(directory)
            engine.start_daemon()
            engine.ensure_image()
        except BaseException:
            engine.close()
            raise
        return engine

    # ---- the private daemon -------------------------------------------------------------

    @property
    def is_private(self) -> bool:
        return self._dir is not None

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise EngineError("an external engine has no private directory")
        return self._dir

    @property
    def log_path(self) -> Path:
        """The private dockerd's log file (appended to across restarts)."""
        return self.directory / "dockerd.log"

    @property
    def daemon_running(self) -> bool:
        if self._dir is None:
            return ping(self.host)
        return self._proc is not None and self._proc.poll() is None

    def daemon_log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, EngineError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _dockerd_command(self) -> list[str]:
        d = self.directory
        command = [
            "dockerd",
            "--host",
            self.host,
            "--data-root",
            str(d / "data"),
            "--exec-root",
            str(d / "exec"),
            "--pidfile",
            str(d / "docker.pid"),
            "--iptables=false",
            "--ip-forward=false",
            "--bridge=none",
            "--storage-driver=vfs",
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # If this process dies without running its finalizers (SIGKILL), the kernel sends
            # dockerd SIGTERM, and dockerd stops its containers and its containerd.
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        return command

    def start_daemon(self, timeout: float = DAEMON_START_TIMEOUT) -> None:
        """(Re)start the private dockerd, same data-root, and wait until it answers /_ping."""
        if self._dir is None:
            pytest.skip("start_daemon() needs the private engine, not an external DOCKER_HOST")
        if self.daemon_running:
            raise EngineError("the private dockerd is already running")
        if self._closed:
            raise EngineError("this engine was closed")
        with self.log_path.open("ab") as log:
            log.write(f"\n==== harness: starting dockerd at {time.ctime()} ====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._dockerd_command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc

        def answered() -> bool:
            if proc.poll() is not None:
                raise EngineError(
                    f"dockerd exited with {proc.returncode} while starting; log tail:\n"
                    + self.daemon_log_tail()
                )
            return ping(self.host, timeout=1.0)

        try:
            wait_until(answered, timeout=timeout, what=f"dockerd to answer on {self.host}")
        except TimeoutError as exc:
            self._terminate(kill_after=5.0)
            raise EngineError(f"{exc}; log tail:\n{self.daemon_log_tail()}") from exc

    def stop_daemon(self, timeout: float = DAEMON_STOP_TIMEOUT) -> None:
        """Stop the private dockerd (SIGTERM, then SIGKILL after ``timeout``) and wait until
        it is down. Containers are stopped by the daemon itself, as on a real host."""
        if self._dir is None:
            pytest.skip("stop_daemon() needs the private engine, not an external DOCKER_HOST")
        if not self.daemon_running:
            raise EngineError("the private dockerd is not running")
        self._terminate(kill_after=timeout)
        wait_until(
            lambda: not ping(self.host, timeout=0.5),
            timeout=10.0,
            what=f"{self.host} to stop answering",
        )

    def _terminate(self, kill_after: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30.0)
        self._proc = None
        self._kill_strays()

    def _stray_pids(self) -> list[int]:
        """Processes left behind by our dockerd: containerd, shims, and container processes.

        They are found by our private directory in their command line, or by one of our
        containers' ids in their cgroup path; nothing else on the machine can match those.
        """
        if self._dir is None:
            return []
        containers_dir = self._dir / "data" / "containers"
        ids = [p.name for p in containers_dir.iterdir()] if containers_dir.is_dir() else []
        return _pids_mentioning(f"{self._dir}/", cgroup_ids=ids)

    def _kill_strays(self) -> None:
        pids = self._stray_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
                    timeout=10.0,
                    what="stray engine processes to exit",
                )

    def close(self) -> None:
        """Remove every container and stop the private daemon; delete its directory.

        Idempotent; called by the session fixture's finalizer and, as a fallback, at exit.
        For an external engine, only the containers labelled by the harness are removed.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self.daemon_running:
                self.remove_test_containers(everything=self.is_private)
        if self._dir is None:
            return
        try:
            self._terminate(kill_after=DAEMON_STOP_TIMEOUT)
        finally:
            _unmount_under(self._dir)
            shutil.rmtree(self._dir, ignore_errors=True)
            if self._lock is not None:
                self._lock.close()
            with contextlib.suppress(ValueError):
                _LIVE_ENGINES.remove(self)

    # ---- the docker CLI ---------------------------------------------------------------

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine; text output. Raises EngineError with the
        command's output if ``check`` and it fails."""
        result = subprocess.run(
            [self._docker, *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args)} exited with {result.returncode}\n"
                f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
            )
        return result

    def run(
        self,
        *command: str,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        tty: bool = False,
        stop_timeout: int | None = 1,
        options: Iterable[str] = (),
        image: str | None = None,
    ) -> str:
        """``docker run -d --network none [options] IMAGE [command...]``; returns the full id.

        ``stop_timeout`` defaults to 1 s because busybox ``sh`` as PID 1 ignores SIGTERM, so
        ``docker stop`` and :meth:`stop_daemon` would otherwise wait 10 s per container;
        pass ``None`` for the engine's default. ``options`` go before the image verbatim
        (``["--log-opt", "max-size=1m"]``, ``["--restart", "always"]``...).
        """
        args = ["run", "-d", "--network", "none", "--label", f"{TEST_LABEL}=1"]
        if name is not None:
            args += ["--name", name]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        if tty:
            args.append("-t")
        if stop_timeout is not None:
            args += ["--stop-timeout", str(stop_timeout)]
        args += [*options, image or self.image, *command]
        container_id = self.docker(*args).stdout.strip()
        if len(container_id) != 64:
            raise EngineError(f"docker run printed {container_id!r}, not a container id")
        self.created.add(container_id)
        return container_id

    def rm(self, container_id: str) -> None:
        """``docker rm -f -v``; a container that is already gone is fine."""
        result = self.docker("rm", "-f", "-v", container_id, check=False)
        if result.returncode != 0 and "No such container" not in result.stderr:
            raise EngineError(f"docker rm {container_id} failed: {result.stderr.strip()}")
        self.created.discard(container_id)

    def inspect(self, container_id: str) -> dict[str, Any]:
        """``GET /containers/{id}/json``."""
        status, body = self.api("GET", f"/containers/{quote(container_id)}/json")
        if status != 200:
            raise EngineError(f"inspect {container_id}: HTTP {status}: {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def wait_exited(self, container_id: str, timeout: float = 30.0) -> int:
        """Wait (polling with a deadline) until the container has exited; its exit code."""

        def exited() -> dict[str, Any] | None:
            state: dict[str, Any] = self.inspect(container_id)["State"]
            return state if state["Status"] == "exited" else None

        state = wait_until(exited, timeout=timeout, what=f"container {container_id[:12]} to exit")
        return int(state["ExitCode"])

    def remove_test_containers(self, *, everything: bool = False) -> None:
        """Remove the containers the harness started (``everything``: all of them; only
        sensible on the private engine, where every container is a test's)."""
        ids = set(self.created)
        listing = ["ps", "-aq", "--no-trunc"]
        if not everything:
            listing += ["--filter", f"label={TEST_LABEL}=1"]
        ids.update(self.docker(*listing).stdout.split())
        if ids:
            result = self.docker("rm", "-f", "-v", *sorted(ids), check=False)
            if result.returncode != 0 and "No such container" not in result.stderr:
                raise EngineError(f"removing test containers failed: {result.stderr.strip()}")
        self.created.clear()

    # ---- the Engine API ---------------------------------------------------------------

    def api(
        self, method: str, path: str, *, body: bytes | None = None, timeout: float = 30.0
    ) -> tuple[int, bytes]:
        """One raw Engine API request: (status, body with HTTP chunking decoded)."""
        return api_request(self.host, method, path, body=body, timeout=timeout)

    def logs_api_bytes(
        self, container_id: str, *, timeout: float = 30.0, **params: str | int | bool
    ) -> bytes:
        """The raw body of ``GET /containers/{id}/logs`` (multiplexed frames unless TTY).

        ``stdout`` and ``stderr`` default to on; booleans become ``1``/``0``. Don't pass
        ``follow=True`` for a container that keeps running: the call would block until
        ``timeout``.
        """
        query = {"stdout": "1", "stderr": "1"}
        for key, value in params.items():
            query[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        path = f"/containers/{quote(container_id)}/logs?{urlencode(query)}"
        status, body = self.api("GET", path, timeout=timeout)
        if status != 200:
            raise EngineError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return body

    # ---- the test image ---------------------------------------------------------------

    def ensure_image(self) -> None:
        """Import ``forwarder-test/busybox:latest`` from the host's static busybox, unless the
        engine already has it, and check that it runs."""
        if self.docker("image", "inspect", self.image, check=False).returncode == 0:
            return
        archive = build_busybox_rootfs()
        result = subprocess.run(
            [
                self._docker,
                "import",
                "--change",
                'CMD ["sh"]',
                "--change",
                "ENV PATH=/bin",
                "-",
                self.image,
            ],
            env=self.env,
            input=archive,
            capture_output=True,
            timeout=120.0,
            check=False,
        )
        if result.returncode != 0:
            raise EngineError(f"docker import failed: {result.stderr.decode(errors='replace')}")
        smoke = self.docker(
            "run", "--rm", "--network", "none", self.image, "true", check=False, timeout=60.0
        )
        if smoke.returncode != 0:
            raise EngineError(
                f"the imported busybox image does not run ({smoke.stderr.strip()}); "
                f"{BUSYBOX} must be statically linked (apt-get install busybox-static)"
            )


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """The applets the host's busybox provides (``busybox --list``)."""
    listing = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=10.0
    )
    return sorted({line.strip() for line in listing.stdout.splitlines() if line.strip()})


def build_busybox_rootfs(busybox: Path = BUSYBOX) -> bytes:
    """A root filesystem tarball: ``/bin/busybox``, a symlink per applet, ``/tmp``, ``/etc``."""
    if not busybox.is_file():
        raise EngineError(f"{busybox} is missing: apt-get install busybox-static")
    applets = busybox_applets(busybox)
    missing = sorted(set(REQUIRED_APPLETS) - set(applets))
    if missing:
        raise EngineError(f"{busybox} lacks the applets {missing}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700)):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox" or "/" in applet:
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _pids_mentioning(marker: str, *, cgroup_ids: Iterable[str] = ()) -> list[int]:
    """Processes (not this one) whose command line contains ``marker``, or whose cgroup path
    contains one of ``cgroup_ids``."""
    ids = list(cgroup_ids)
    me = os.getpid()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            cgroup = (entry / "cgroup").read_text() if ids else ""
        except OSError:
            continue
        if marker in cmdline.decode(errors="replace") or any(i in cgroup for i in ids):
            pids.append(int(entry.name))
    return pids


def _unmount_under(directory: Path) -> None:
    """Detach the mounts a killed dockerd may have left under ``directory`` (netns files...)."""
    prefix = str(directory) + "/"
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    points = [fields[4] for line in mountinfo.splitlines() if len(fields := line.split()) > 4]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True, timeout=30.0)


def _hold_lock(directory: Path) -> IO[bytes]:
    """Take the directory's owner lock, held until the returned file is closed. The lock file
    appears under its final name already locked, so a reaper never sees it free."""
    staging = directory / f".{LOCK_NAME}.{os.getpid()}"
    lock = staging.open("wb")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    staging.rename(directory / LOCK_NAME)
    return lock


def reap_stale_private_dirs(parent: Path = Path("/tmp")) -> list[Path]:
    """Delete the private engine directories of sessions that died without cleaning up.

    A directory is stale when its owner lock is free (the owner is gone) and no process has
    it in its command line (no dockerd, containerd or shim of it survives). Directories
    without a lock file are left alone.
    """
    removed: list[Path] = []
    for directory in sorted(parent.glob(f"{PRIVATE_DIR_PREFIX}*")):
        try:
            lock = (directory / LOCK_NAME).open("rb")
        except OSError:
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            if _pids_mentioning(f"{directory}/"):
                continue
            _unmount_under(directory)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


# Engines still running, stopped at interpreter exit if no finalizer did it (a crash, Ctrl-C
# in the wrong place). setpriv's parent-death signal covers a SIGKILL of this process.
_LIVE_ENGINES: list[Engine] = []


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        with contextlib.suppress(Exception):
            engine.close()

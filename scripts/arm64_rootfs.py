"""An arm64 Debian userland (under qemu-user emulation) in which the device agent runs, cached.

Devices are ARM; the machines that build and test are x86. Under ``qemu-aarch64``
the agent's own Python, onnxruntime's, LiteRT's and numpy's real aarch64 wheels and
their int8 kernels run instruction by instruction as an ARM core would run them, so
numerics seen here are the device's (timing and memory are not: see
docs/agent.md).

``build`` makes (or reuses) a bookworm arm64 rootfs with python3 and a venv
holding the agent extra's dependencies and the test packages, as the working
tree's ``pyproject.toml`` declares them. It lives outside the repository, in
two cached layers keyed on hashes of their inputs: the Debian base under
``/var/cache/edgefleet/arm64-<key>`` (suite, packages, recipe: ~10 min to
build under emulation on 2 loaded cores), and inside it the venv
``/opt/edgefleet-<key>`` (the agent extra, LiteRT, the test packages, the base's key:
~10 min, pip itself emulated). A changed input
rebuilds its layer and what sits on it; an unchanged one costs nothing.
``run -- CMD...`` executes a command inside it with the working tree mounted
read-only at ``/src`` (first on ``PYTHONPATH``, so the code under test is
always the tree's, never a copy from build time).

The pitfalls this handles, each seen on this kind of machine:

- ``binfmt_misc`` is often not mounted in a container: it is mounted and
  ``qemu-aarch64`` enabled (``update-binfmts``) before anything runs;
- onnxruntime's cpuinfo parses ``/proc/cpuinfo`` and segfaults on the host's
  x86 text under qemu 7.2: an ARM cpuinfo (matching ``QEMU_CPU``) is
  bind-mounted over it;
- the host's CA variables (``SSL_CERT_FILE``, ``PIP_CERT``...) name a bundle
  that must exist inside too: the host's bundle is copied to the same path,
  and the chroot gets a clean environment;
- deleting a rootfs with ``/dev`` bind-mounted into it deletes the host's
  device nodes: every mount is made inside a private mount namespace
  (``unshare -m``) that dies with the command, and a rootfs is removed only
  after checking that nothing is mounted under it.

Exit codes: 0 ok, 77 cannot run here (not root, no binfmt, no packages) with
the reason on stderr, 1 anything else. ``check`` prints the reason only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEFLEET_ARM64_CACHE", "/var/cache/edgefleet"))
SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
HOST_PACKAGES = ("qemu-user-static", "binfmt-support", "mmdebstrap")
# The agent tests' own needs: pytest and its plugins, and onnx (the test harness writes tiny models).
TEST_PACKAGES = ("pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "onnx>=1.16")
RECIPE = "1"  # bump when the build steps below change what lands in the Debian base
VENV_RECIPE = "1"  # ... or in the venv
SRC = "/src"  # the working tree, mounted read-only
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
EXIT_CANNOT = 77
MARKER = ".edgefleet-complete"

# MIDR part numbers (implementer 0x41, Arm) for the CPUs QEMU_CPU names; cpuinfo only needs a
# plausible ARM text, the features an int8 kernel uses come from the auxv qemu builds per CPU.
_V82 = "fp asimd evtstrm crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
CPU_PARTS = {
    "cortex-a53": ("0xd03", "fp asimd evtstrm crc32 cpuid"),
    "cortex-a57": ("0xd07", "fp asimd evtstrm crc32 cpuid"),
    "cortex-a72": ("0xd08", "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": ("0xd0b", _V82),
    "neoverse-n1": ("0xd0c", _V82),
    "max": ("0xd0c", _V82 + " sve i8mm"),
}


class CannotRun(Exception):
    """This machine cannot run the lane (not root, no binfmt_misc, no qemu): a skip, with the reason."""


def agent_requirements(pyproject: Path = PROJECT / "pyproject.toml") -> list[str]:
    """The base dependencies, the ``agent`` extra and LiteRT, as the working tree declares them.

    LiteRT is the ``ai-edge-litert`` entry of the ``tflite`` extra alone (the agent serves
    ``.tflite`` bundles with it; the extra's quantizer is a compiler tool a device never runs),
    so its version bound is the tree's and a change to it rebuilds the venv.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    litert = [r for r in extras["tflite"] if r.startswith("ai-edge-litert")]
    if len(litert) != 1:
        raise ValueError(f"the tflite extra should name ai-edge-litert once, it names {litert}")
    return [*project["dependencies"], *extras["agent"], *litert]


def _key(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def base_key() -> str:
    """A hash of what changes the Debian base."""
    return _key({"suite": SUITE, "debian": sorted(DEBIAN_PACKAGES), "recipe": RECIPE})


def venv_key(requirements: Sequence[str]) -> str:
    """A hash of what changes the venv; the agent's own code is not in it (it is mounted at /src)."""
    return _key(
        {
            "base": base_key(),
            "requirements": sorted(requirements),
            "tests": sorted(TEST_PACKAGES),
            "recipe": VENV_RECIPE,
        }
    )


def rootfs_path() -> Path:
    return CACHE / f"arm64-{base_key()}"


def venv_path(requirements: Sequence[str] | None = None) -> str:
    """The venv's path inside the rootfs."""
    reqs = requirements if requirements is not None else agent_requirements()
    return f"/opt/edgefleet-{venv_key(reqs)}"


def cpuinfo_text(cpu: str, cores: int | None = None) -> str:
    """An aarch64 ``/proc/cpuinfo`` for ``cpu`` (a QEMU_CPU name), one block per host core."""
    part, features = CPU_PARTS.get(cpu, CPU_PARTS["max"])
    block = (
        "processor\t: {n}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 0\n"
    )
    return "\n".join(
        block.format(n=n, features=features, part=part) for n in range(cores or os.cpu_count() or 1)
    )


# -- the host: root, packages, binfmt -------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_host() -> None:
    """Root, the Debian packages, binfmt_misc mounted and qemu-aarch64 enabled; else CannotRun."""
    if os.geteuid() != 0:
        raise CannotRun("needs root (mmdebstrap, chroot, mount, binfmt_misc); run it as root or skip")
    missing = [p for p in HOST_PACKAGES if not _installed(p)]
    if missing:
        if not shutil.which("apt-get"):
            raise CannotRun(f"needs the Debian packages {', '.join(missing)} and there is no apt-get")
        _say(f"installing {', '.join(missing)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        subprocess.run(["apt-get", *lock, "update", "-qq"], check=False, env=env)
        done = subprocess.run(["apt-get", *lock, "install", "-y", "-qq", *missing], env=env)
        if done.returncode != 0:
            raise CannotRun(f"apt-get could not install {', '.join(missing)}")
    if not (BINFMT / "status").exists():
        done = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise CannotRun(f"cannot mount binfmt_misc ({done.stderr.strip()}): no foreign binaries here")
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, check=False)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise CannotRun("binfmt_misc has no enabled qemu-aarch64 entry (update-binfmts failed)")


def _installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return done.returncode == 0 and "install ok installed" in done.stdout


# -- mounts and the chroot ------------------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace."""
    prefix = str(root.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def remove_rootfs(root: Path) -> None:
    """Delete a rootfs, but never one with anything (``/dev`` above all) mounted into it."""
    busy = mounts_under(root)
    if busy:
        raise RuntimeError(f"refusing to delete {root}: still mounted there: {', '.join(busy)}")
    shutil.rmtree(root, ignore_errors=True)


def chroot_command(
    root: Path,
    argv: Sequence[str],
    *,
    cpu: str = "max",
    env: dict[str, str] | None = None,
    venv: str = "",
    binds: Sequence[Path] = (),
) -> list[str]:
    """``unshare -m`` + a shell that mounts proc, sys, /dev, an ARM cpuinfo and the tree, then chroots.

    sysfs matters to LiteRT: XNNPACK's cpuinfo reads the CPU lists under
    ``/sys/devices/system/cpu`` and, without them, fails to initialize, and LiteRT silently
    runs its built-in kernels instead of the XNNPACK ones a device runs.

    ``binds``: host directories to mount at the same path inside (writable), e.g. a test's
    temporary directory holding an agent's config, keys and data. Every mount lives in the new
    private namespace and goes away with the command, so no bind mount outlives it (nothing of
    the host's /dev stays reachable from the cache)."""
    cpuinfo = root / "etc" / "edgefleet-cpuinfo"
    cpuinfo.write_text(cpuinfo_text(cpu))
    shutil.copyfile(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
    if Path("/etc/resolv.conf").exists():
        shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
    (root / SRC.lstrip("/")).mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    base_env = {
        "PATH": f"{venv or venv_path()}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "QEMU_CPU": cpu,
        "PYTHONPATH": SRC,
        "PYTHONDONTWRITEBYTECODE": "1",
        "SSL_CERT_FILE": str(CA_BUNDLE),
        "PIP_CERT": str(CA_BUNDLE),
        "REQUESTS_CA_BUNDLE": str(CA_BUNDLE),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "180",
        **(env or {}),
    }
    r = str(root)
    script = "\n".join(
        [
            "set -e",
            f"mount -t proc proc {r}/proc",
            f"mount --bind {cpuinfo} {r}/proc/cpuinfo",
            f"mount -t sysfs sysfs {r}/sys",
            f"mount --rbind /dev {r}/dev",
            f"mount -t tmpfs tmpfs {r}/dev/shm 2>/dev/null || true",
            f"mount --bind {PROJECT} {r}{SRC}",
            f"mount -o remount,bind,ro {r}{SRC}",
            *[f"mkdir -p {r}{b} && mount --bind {b} {r}{b}" for b in (str(Path(p).resolve()) for p in binds)],
            'exec chroot "$0" /usr/bin/env -i "$@"',
        ]
    )
    envs = [f"{k}={v}" for k, v in base_env.items()]
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, r, *envs, *argv]


def run_inside(
    root: Path,
    argv: Sequence[str],
    *,
    cpu: str = "max",
    env: dict[str, str] | None = None,
    cwd: str = SRC,
    check: bool = False,
    venv: str = "",
    binds: Sequence[Path] = (),
    **kwargs: object,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the arm64 userland (from ``cwd`` inside it); returns the finished process."""
    command = chroot_command(root, inside(argv, cwd), cpu=cpu, env=env, venv=venv, binds=binds)
    return subprocess.run(command, check=check, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def inside(argv: Sequence[str], cwd: str = SRC) -> list[str]:
    """``argv`` run from ``cwd`` inside the chroot (exec: signals reach it, as a service's would)."""
    return ["/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]


# -- the build ------------------------------------------------------------------------------------


def build(force: bool = False) -> Path:
    """The cached rootfs for the working tree's inputs, each layer built when missing (or ``force``)."""
    ensure_host()
    requirements = agent_requirements()
    root, venv = rootfs_path(), venv_path(requirements)
    if force and root.exists():
        remove_rootfs(root)
    steps: list[tuple[str, Callable[[], None]]] = []
    partial = root.with_name(root.name + ".partial")
    if not (root / MARKER).exists():
        if partial.exists():
            remove_rootfs(partial)
        CACHE.mkdir(parents=True, exist_ok=True)
        steps.append((f"debootstrap arm64 {SUITE}", lambda: _debootstrap(partial)))
        steps.append(("mark the base", lambda: _finish_base(partial, root)))
    if not (root / venv.lstrip("/") / MARKER).exists():
        steps.append(("venv", lambda: _venv(root, venv)))
        steps.append(("pip install the agent extra + test packages", lambda: _pip(root, venv, requirements)))
        steps.append(
            ("import check (onnxruntime, LiteRT on aarch64)", lambda: _smoke(root, venv, requirements))
        )
    for _label, step in _progress(steps):
        step()
    for old in CACHE.glob("arm64-*"):  # other keys: a changed input made them stale
        if old != root:
            _remove_quietly(old)
    for old in (root / "opt").glob("edgefleet*"):
        if f"/opt/{old.name}" != venv:
            shutil.rmtree(old, ignore_errors=True)
    return root


def _remove_quietly(path: Path) -> None:
    try:
        remove_rootfs(path)
    except RuntimeError as exc:
        _say(str(exc))


def _finish_base(partial: Path, root: Path) -> None:
    (partial / MARKER).write_text(json.dumps({"base": base_key(), "built": time.time()}))
    partial.rename(root)


def _progress(steps: Sequence[tuple[str, Callable[[], None]]]) -> Iterator[tuple[str, Callable[[], None]]]:
    """The steps, under a rich progress bar with elapsed time when rich is importable (the project's
    venv has it; a bare ``python3`` on a fresh machine may not, and then plain lines do)."""
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        for label, step in steps:
            _say(f"arm64 rootfs: {label}")
            yield label, step
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("arm64 rootfs", total=len(steps))
        for label, step in steps:
            progress.update(task, description=f"arm64 rootfs: {label}")
            yield label, step
            progress.advance(task)


def _debootstrap(root: Path) -> None:
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--architectures=arm64",
            "--variant=minbase",
            f"--include={','.join(DEBIAN_PACKAGES)}",
            SUITE,
            str(root),
        ],
        check=True,
    )


def _venv(root: Path, venv: str) -> None:
    shutil.rmtree(root / venv.lstrip("/"), ignore_errors=True)
    run_inside(root, ["python3", "-m", "venv", venv], cwd="/", check=True, venv=venv)


def _pip(root: Path, venv: str, requirements: Sequence[str]) -> None:
    pip = [f"{venv}/bin/pip", "install", "-q", *requirements, *TEST_PACKAGES]
    run_inside(root, pip, cwd="/", check=True, venv=venv)


def _smoke(root: Path, venv: str, requirements: Sequence[str]) -> None:
    probe = (
        "import platform, numpy, onnxruntime, ai_edge_litert.interpreter;"
        " print(platform.machine(), onnxruntime.__version__)"
    )
    done = run_inside(root, ["python", "-c", probe], cwd="/", check=True, capture_output=True, venv=venv)
    if not done.stdout.startswith("aarch64"):
        raise RuntimeError(f"the rootfs does not run aarch64 code: {done.stdout!r}")
    record = {"requirements": list(requirements), "tests": list(TEST_PACKAGES), "probe": done.stdout.strip()}
    (root / venv.lstrip("/") / MARKER).write_text(json.dumps(record))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="say whether the lane can run here (exit 77 and why if not)")
    b = sub.add_parser("build", help="build the rootfs (or reuse the cached one); print its path")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    r = sub.add_parser("run", help="run a command inside (the tree at /src)")
    r.add_argument("--cpu", default="max", help="QEMU_CPU: cortex-a53, cortex-a72, neoverse-n1, max...")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            ensure_host()
            print("ok")
            return 0
        root = build(force=getattr(args, "force", False))
        if args.command == "build":
            print(root)
            return 0
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return run_inside(root, command or ["python", "-V"], cpu=args.cpu).returncode
    except CannotRun as exc:
        _say(f"arm64 lane skipped: {exc}")
        return EXIT_CANNOT
    except subprocess.CalledProcessError as exc:
        _say(f"arm64 rootfs: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

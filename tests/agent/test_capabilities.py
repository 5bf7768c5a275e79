"""The capabilities a device reports: its runtimes read without importing them or their metadata API.

Idle memory is a device's scarcest budget (a LiteRT device's agent must stay under 60 MB,
``bench/agent.py``), so reporting which runtimes are installed must not cost the imports that
``importlib.metadata`` brings (email, zipfile, csv: 1.3 MB) or the runtimes themselves.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from device_agent.runtime import available_runtimes, installed_version
from tests.support.fresh_imports import imported_by


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def test_every_installed_wheel_reads_as_importlib_metadata_reads_it() -> None:
    """The whole environment as the reference: each distribution whose metadata is a dist-info
    directory reads the same version both ways (the first on sys.path, as an import finds it)."""
    checked = 0
    seen: set[str] = set()
    for dist in metadata.distributions():
        path = getattr(dist, "_path", None)
        name = _normalized(dist.metadata["Name"])
        if not isinstance(path, Path) or path.suffix != ".dist-info" or name in seen:
            continue
        seen.add(name)
        assert installed_version(name) == metadata.version(dist.metadata["Name"]), name
        checked += 1
    assert checked > 50  # the suite's venv: the agent, server, compiler and their dependencies


def test_the_first_on_the_path_wins_and_unreadable_entries_are_passed_over(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for where, version in ((first, "2.3.0"), (second, "1.0")):
        (where / f"ai_edge_litert-{version}.dist-info").mkdir(parents=True)
    (first / "ai_edge_litert_extra-9.dist-info").mkdir()  # a longer name with the same start
    (second / "Foo.Bar-1.0rc1.dist-info").mkdir()  # old installers keep the case and the dot
    (second / "tflite_runtime-2.14.0-py3.11.egg-info").mkdir()  # setuptools, as some distros ship it
    (second / "numpy-1.26.4.egg-info").write_text("Metadata-Version: 2.1\n")  # an egg-info file
    (first / "onnxruntime").mkdir()  # a package, not its metadata
    zipped, missing = tmp_path / "lib.zip", tmp_path / "nowhere"
    zipped.write_bytes(b"PK\x05\x06" + bytes(18))
    path = [str(missing), str(zipped), str(first), str(second)]
    assert installed_version("ai_edge_litert", path) == "2.3.0"
    assert installed_version("ai_edge_litert", path[3:]) == "1.0"
    assert installed_version("foo_bar", path) == "1.0rc1"
    assert installed_version("tflite_runtime", path) == "2.14.0"
    assert installed_version("numpy", path) == "1.26.4"
    assert installed_version("onnxruntime", path) is None
    assert installed_version("ai_edge", path) is None


def test_reporting_the_runtimes_imports_neither_them_nor_the_metadata_api() -> None:
    """A fresh agent on a LiteRT device (onnxruntime cannot be imported) builds its capabilities."""
    code = "\n".join(
        [
            "from pathlib import Path",
            "import tempfile",
            "from device_agent.config import AgentConfig",
            "from device_agent.capabilities import capabilities",
            "from device_agent.runtime import AutoRuntimeFactory",
            "d = Path(tempfile.mkdtemp())",
            "cfg = AgentConfig('d', 'hw', d, d / 'trust.json', targets=['tflite-int8'])",
            "caps = capabilities(cfg, AutoRuntimeFactory())",
            "assert 'litert' in caps['runtimes'], caps",
        ]
    )
    watched = ("importlib.metadata", "email", "zipfile", "http.cookiejar", "ai_edge_litert")
    assert imported_by(code, watched, blocked=("onnxruntime",)) == []


def test_the_runtimes_reported_here() -> None:
    found = available_runtimes()
    assert found["onnxruntime"] == {
        "version": metadata.version("onnxruntime"),
        "providers": ["CPUExecutionProvider"],
    }
    assert found["litert"] == {"version": metadata.version("ai-edge-litert")}

"""The wheel installs everything under kilnlm/ (no generic top-level names) and carries the demo model."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


def test_wheel_contents(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{result.stderr[-2000:]}")
    (wheel,) = tmp_path.glob("kilnlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level <= {"kilnlm"} | {n for n in top_level if n.endswith(".dist-info")}, top_level
    for module in ("runtime/engine.py", "runtime/models/llama.py", "export/hf.py", "kernels/__init__.py",
                   "cli/main.py", "quant/__init__.py", "errors.py", "__init__.py"):
        assert f"kilnlm/{module}" in names
    assert not any(name.startswith("kilnlm/tests/") for name in names)
    for artifact in ("config.json", "model.safetensors", "tokenizer.model", "TRAINING.md"):
        assert f"kilnlm/runtime/demo_model/{artifact}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kiln = kilnlm.cli.main:main" in entry_points


def test_import_from_outside_the_checkout(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import kilnlm, kilnlm.runtime.engine; print(kilnlm.Engine)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Engine" in result.stdout


def test_runtime_does_not_import_exporter_only_code(tmp_path):
    code = ("import sys, kilnlm.runtime.engine; "
            "bad = [m for m in sys.modules if m.startswith(('kilnlm.quant.gptq', 'kilnlm.quant.calibration', "
            "'kilnlm.export.onnx', 'transformers'))]; print(bad); assert not bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

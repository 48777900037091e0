"""Packaging: pyproject.toml declares what requirements.txt installs, a pip build installs no
importable package (nothing named ``common`` in site-packages), and the flag that keeps the
build quiet really silences gcc's AVX-512 ABI notes."""
import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements():
    out = {}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
                out[name] = line.replace(" ", "")
    return out


def _setup_constant(name):
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def test_pyproject_declares_the_requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    req = _requirements()
    declared = project["project"]["dependencies"] + \
        [d for extra in project["project"]["optional-dependencies"].values() for d in extra]
    for dep in declared:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
        assert req.get(name) == dep.replace(" ", ""), f"{dep} vs requirements.txt {req.get(name)}"
    runtime = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower()
               for d in project["project"]["dependencies"]}
    assert {"torch", "torchvision", "scipy", "pycocotools", "matplotlib"} <= runtime
    assert "torch==2.14.1" in project["build-system"]["requires"]  # the extension links torch


def test_metadata_names_no_top_level_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=src, check=True, capture_output=True)
    info = tmp_path / "detrkd.egg-info"
    assert (info / "top_level.txt").read_text().strip() == ""
    sources = (info / "SOURCES.txt").read_text().split()
    assert not any(s.endswith(".py") and s != "setup.py" for s in sources)
    assert "torch==2.14.1" in (info / "requires.txt").read_text().split()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_quiet_flags_silence_the_avx512_abi_note(tmp_path):
    # a 64-byte vector passed by value: what gcc's AVX-512 headers do, noted under -Wpsabi
    (tmp_path / "v.cpp").write_text(
        "typedef float v16 __attribute__((vector_size(64)));\n"
        "v16 g(v16 a, v16 b);\nv16 f(v16 a, v16 b) { return g(a, b) + a; }\n")
    cmd = ["g++", "-O3", "-c", str(tmp_path / "v.cpp"), "-o", str(tmp_path / "v.o")]
    loud = subprocess.run(cmd, capture_output=True, text=True)
    assert "ABI" in loud.stderr  # the note exists without the flag
    quiet = subprocess.run(cmd + _setup_constant("QUIET_CXX"), capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""

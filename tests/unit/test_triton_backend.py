"""piaa_triton.backend: the Python backend folder of symlinks, idempotent and loud when files are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from piaa_triton.backend import BACKEND_FILES, STUB_NAME, TritonWheel, find_wheel, prepare, python_minor
from piaa_triton.exceptions import BackendNotFoundError


def fake_wheel(root: Path, stub_minor: str) -> TritonWheel:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_text("")
    (root / "backends" / "python").mkdir(parents=True)
    for name in BACKEND_FILES:
        (root / "backends" / "python" / name).write_text(name)
    (root / "python_backend_stubs" / stub_minor).mkdir(parents=True)
    (root / "python_backend_stubs" / stub_minor / STUB_NAME).write_text("stub")
    return TritonWheel(root)


def test_prepare_links_the_backend_and_the_matching_stub(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "wheel", python_minor())
    target = tmp_path / "backends"
    assert prepare(target, wheel) is True
    folder = target / "python"
    assert sorted(p.name for p in folder.iterdir()) == sorted((*BACKEND_FILES, STUB_NAME))
    assert (folder / STUB_NAME).readlink() == wheel.stub(python_minor())
    assert prepare(target, wheel) is False  # up to date


def test_prepare_repairs_a_wrong_link(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "wheel", python_minor())
    target = tmp_path / "backends"
    prepare(target, wheel)
    stub = target / "python" / STUB_NAME
    stub.unlink()
    stub.symlink_to(tmp_path / "elsewhere")
    assert prepare(target, wheel) is True
    assert stub.readlink() == wheel.stub(python_minor())


def test_a_stub_for_another_python_is_refused(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "wheel", "3.8")
    with pytest.raises(BackendNotFoundError, match=rf"python_backend_stubs/{python_minor()}/{STUB_NAME}"):
        prepare(tmp_path / "backends", wheel)


def test_the_installed_wheel_has_what_we_link() -> None:
    wheel = find_wheel()
    assert wheel.server_binary.is_file()
    assert wheel.stub(python_minor()).is_file()
    assert all((wheel.python_backend / name).is_file() for name in BACKEND_FILES)

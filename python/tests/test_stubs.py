"""The type stubs (tessera/_tessera.pyi) describe the module as built: mypy's stubtest compares
every class, method, signature and default, and mypy checks tessera.torch and the example
against them."""

import subprocess
import sys
from pathlib import Path

import tessera

PYTHON = Path(__file__).resolve().parents[1]


def test_stubs_match_the_extension_module(tmp_path):
    assert (Path(tessera.__file__).parent / "py.typed").exists(), "the wheel ships py.typed"
    assert (Path(tessera.__file__).parent / "_tessera.pyi").exists(), "the wheel ships the stubs"
    ran = subprocess.run([sys.executable, "-m", "mypy.stubtest", "tessera._tessera"], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_the_torch_module_and_the_example_type_check(tmp_path):
    for what in (["-p", "tessera"], [str(PYTHON / "examples" / "ctr.py")]):
        ran = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", *what], capture_output=True, text=True, cwd=tmp_path)
        assert ran.returncode == 0, ran.stdout + ran.stderr


def test_every_class_has_a_docstring():
    for name in tessera.__all__:
        obj = getattr(tessera, name)
        if isinstance(obj, type):
            assert obj.__doc__ and len(obj.__doc__) > 20, f"tessera.{name} has no docstring"
    for method in (tessera.Client.create_table, tessera.Table.push, tessera.Table.pull, tessera.Ticket.wait):
        assert method.__doc__, method

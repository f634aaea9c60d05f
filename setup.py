"""Build echod: the data path (service/echod/build.py COMPILED) compiled with mypyc where it can be.

Everything else about the package is in pyproject.toml; this file only decides whether to compile.

ECHOD_COMPILE (at build time):
  auto (default)  compile when a C compiler and Python's headers work; otherwise build interpreted, saying so
  1               compile, and fail the build when it cannot (CI: `make test`)
  0               interpreted: the package as plain Python, exactly as without mypyc

Editable installs (`pip install -e`, `make run`) are always interpreted, and in-place builds are refused:
a compiled module in the checkout would be imported instead of the `.py` beside it after an edit.
A module mypyc cannot compile fails the build with mypyc's own errors; it is never skipped quietly.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "service"
# Commands that build the package's files; metadata-only runs (egg_info, dist_info, sdist) never compile.
BUILDS = {"bdist_wheel", "build", "build_ext", "install"}
EDITABLE = {"editable_wheel", "develop"}


def say(text: str) -> None:
    print(f"echod build: {text}", file=sys.stderr, flush=True)


def compiled_modules() -> list[str]:
    """COMPILED from service/echod/build.py, read as text (echod's dependencies are not installed here)."""
    tree = ast.parse((SOURCE / "echod" / "build.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise SystemExit("echod build: no COMPILED tuple in service/echod/build.py")


def module_path(name: str) -> Path:
    return SOURCE.joinpath(*name.split(".")).with_suffix(".py")


def compiler_works() -> str | None:
    """Why C extensions cannot be built here, or None when a test one compiles against Python.h."""
    from setuptools._distutils import ccompiler
    from setuptools._distutils import sysconfig as dist_sysconfig
    from setuptools._distutils.errors import CCompilerError, DistutilsError

    compiler = ccompiler.new_compiler()
    dist_sysconfig.customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.c")
        probe.write_text("#include <Python.h>\nint echod_probe(void) { return 0; }\n")
        try:
            compiler.compile([str(probe)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]])
        except (CCompilerError, DistutilsError, OSError) as exc:
            return f"no working C compiler with Python's headers ({exc})"
    return None


def decide() -> bool:
    """Whether this run of setup.py compiles."""
    mode = os.environ.get("ECHOD_COMPILE", "auto").strip().lower() or "auto"
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"echod build: ECHOD_COMPILE must be auto, 0 or 1, not {mode!r}")
    args = set(sys.argv[1:])
    if args & {"--inplace", "-i"}:
        raise SystemExit(
            "echod build: in-place builds are refused: a compiled module in the checkout would shadow "
            "its edited source. Use `pip install .` (compiled) or `pip install -e .` (interpreted)."
        )
    if args & EDITABLE:
        say("editable install: interpreted (an editable install never runs compiled code)")
        return False
    if not args & BUILDS:
        return False
    if mode == "0":
        say("ECHOD_COMPILE=0: interpreted")
        return False
    why_not = compiler_works()
    if why_not is None:
        return True
    if mode == "1":
        raise SystemExit(f"echod build: ECHOD_COMPILE=1 but {why_not}")
    say(f"{why_not}: interpreted (set ECHOD_COMPILE=1 to make this an error)")
    return False


def mypyc_extensions(modules: list[str]) -> list[object]:
    from mypyc.build import mypycify

    build_dir = ROOT / "build"
    build_dir.mkdir(exist_ok=True)
    # The build's own mypy settings, not pyproject's [tool.mypy]: that one loads the pydantic plugin,
    # which the build environment lacks. Strictness is `make lint`'s job; here mypy only needs the types.
    # Imported, not compiled, modules are analysed for their types, their errors left to `make lint`.
    config = build_dir / "mypyc.ini"
    config.write_text(
        "[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n"
        f"mypy_path = {SOURCE}\nexplicit_package_bases = True\n"
    )
    paths = [str(module_path(name).relative_to(ROOT)) for name in modules]
    say(f"compiling {len(modules)} modules with mypyc: {', '.join(modules)}")
    try:
        return list(mypycify(["--config-file", str(config), *paths], group_name="echod"))
    except SystemExit:
        say(
            "mypyc cannot compile the modules above (its errors are printed above). Fix the code, "
            "take the module out of COMPILED in service/echod/build.py, or build interpreted with "
            "ECHOD_COMPILE=0."
        )
        raise


class BuildPy(build_py):
    """Also writes echod/_compiled.py (compiled builds) and clears a previous build's extensions."""

    compiling = False

    def run(self) -> None:
        super().run()
        package = Path(self.build_lib, "echod")
        record = package / "_compiled.py"
        record.unlink(missing_ok=True)
        if not self.compiling:
            # build/ outlives a build (pip builds in the tree): keep an old compiled build's .so files
            # out of an interpreted one.
            for old in [*package.rglob("*.so"), *Path(self.build_lib).glob("echod__mypyc*.so")]:
                old.unlink()
            return
        digests = {
            name: hashlib.sha256(module_path(name).read_bytes()).hexdigest() for name in compiled_modules()
        }
        record.write_text(
            '"""Written by setup.py: the source each compiled module was built from (echod/build.py)."""\n\n'
            f"SOURCE_SHA256 = {digests!r}\n"
        )


compiling = decide()
BuildPy.compiling = compiling
setup(
    cmdclass={"build_py": BuildPy},
    ext_modules=mypyc_extensions(compiled_modules()) if compiling else [],
)

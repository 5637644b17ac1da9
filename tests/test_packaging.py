"""Native sources: what a non-editable install ships of them, and what a build's cache key covers."""

import ast
import fnmatch
import re
from pathlib import Path

import pytest

import treeq
from treeq import native

ROOT = Path(treeq.__file__).parent


def package_data() -> dict[str, list[str]]:
    """pyproject.toml's [tool.setuptools.package-data] (``"package" = ["pattern", ...]`` lines; no
    tomllib before Python 3.11)."""
    text = (ROOT.parent / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    return {m[1]: ast.literal_eval(m[2]) for m in re.finditer(r'^"([\w.]+)" = (\[.*\])$', section, re.MULTILINE)}


def test_every_native_source_and_header_is_package_data():
    # Checked to fail before clip_error.cpp, methods/gptq_columns.cpp and grid_steps.h were listed:
    # a wheel then held the kernels' sources alone, and the clip search and GPTQ's column loop
    # could not build.
    patterns = package_data()
    assert "treeq.kernels" in patterns
    missing = []
    for path in sorted(ROOT.rglob("*")):
        if path.suffix not in (".cpp", ".h"):
            continue
        package = ".".join(path.parent.relative_to(ROOT.parent).parts)
        if not any(fnmatch.fnmatch(path.name, p) for p in patterns.get(package, [])):
            missing.append(str(path.relative_to(ROOT.parent)))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_a_missing_source_is_a_reason_not_an_error(tmp_path):
    lib, why = native.build(tmp_path / "absent.cpp", ("-O0",))
    assert lib is None and "absent.cpp is not installed" in why


@pytest.mark.parametrize(
    "outer",
    [None, '#pragma once\n#include "outer.h"\n#include "steps.h"\n'],  # steps.h included directly; by a header
)
def test_a_changed_local_header_changes_the_cache_key(tmp_path, outer):
    """Also a header included by a header (amx_emulated.h by avx512_tiles.h, which the kernels
    include); a header that includes itself is read once."""
    # Checked to fail with the headers left out of source_text, and (outer) with one level only.
    (tmp_path / "steps.h").write_text("inline int f() { return 1; }\n")
    if outer:
        (tmp_path / "outer.h").write_text(outer)
    source = tmp_path / "loop.cpp"
    source.write_text(f'#include <cmath>\n#include "{"outer.h" if outer else "steps.h"}"\nint g() {{ return f(); }}\n')
    before = native.source_text(source)
    (tmp_path / "steps.h").write_text("inline int f() { return 2; }\n")
    assert native.source_text(source) != before

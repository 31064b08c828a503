"""Every folder that is a Python package is installed as kvrelay.<folder...> (docs/ARCHITECTURE.md "Layout")."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {folder: name for name, folder in cfg["package-dir"].items()}
    found = set()
    for folder, name in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"


def test_no_top_level_folder_shadows_an_installed_package():
    """Under pytest the repository root is on sys.path, so a package folder there named like an
    installed distribution's module (transformers >= 5.25 imports `kernels`) would be imported instead."""
    from importlib.metadata import packages_distributions

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = packages_distributions()
    clashes = {folder: installed[folder] for folder in cfg["package-dir"].values() if folder in installed}
    assert not clashes, f"top-level folders shadow installed packages: {clashes}"

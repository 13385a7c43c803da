"""Maps the top-level folders into the `loraplex` namespace (DESIGN.md §1).

`operator/`, `server/` and `kernels/` carry no `__init__.py` at their top, so a bare
`import operator` or transformers' probe for the `kernels` package never finds them from the
repo root. Subpackages below them are regular packages and are listed here from the tree, so a
wheel (not only an editable install) contains them.
"""

from pathlib import Path

from setuptools import setup

PACKAGE_DIRS = {
    "loraplex": "loraplex",
    "loraplex.operator": "operator",
    "loraplex.server": "server",
    "loraplex.kernels": "kernels",
    "loraplex.localcluster": "e2e/cluster",
}


def find_packages() -> list[str]:
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        packages.append(name)
        for init in sorted(Path(folder).rglob("__init__.py")):
            parts = init.parent.relative_to(folder).parts
            if parts and "__pycache__" not in parts:
                packages.append(".".join((name, *parts)))
    return packages


setup(
    package_dir=PACKAGE_DIRS,
    packages=find_packages(),
    package_data={"": ["*.json", "*.yaml", "*.sh", "*.jinja", "*.txt"]},
)

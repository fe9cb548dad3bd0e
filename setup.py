"""Build glue that pyproject.toml cannot express: the Hydra configs stay in ``conf/`` at the top of
the repository (where the design and the docs put them) and are shipped inside the package as
``lightning_distnn/conf``, so ``distnn-train`` finds them after a non-editable ``pip install .``.
Everything else (metadata, dependencies, entry points) is in pyproject.toml. Packages are found as
pyproject's `packages.find` found them (namespace packages included)."""

from setuptools import find_namespace_packages, setup

CONF_PACKAGE = "lightning_distnn.conf"

setup(
    packages=find_namespace_packages(include=["lightning_distnn", "lightning_distnn.*"]) + [CONF_PACKAGE],
    package_dir={CONF_PACKAGE: "conf"},
    package_data={CONF_PACKAGE: ["*.yaml", "*/*.yaml"]},
)

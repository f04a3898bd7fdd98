"""Packages are found rather than listed, so a new subpackage ships without anyone remembering to add it.

The default rules live in the top-level rules/ folder and ship as gradscope.rules; pyproject.toml's
static tables cannot combine a package search with such a mapped folder, which is why this file exists.
Everything else about the build is in pyproject.toml.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["gradscope", "gradscope.*"]) + ["gradscope.rules"],
    package_dir={"gradscope.rules": "rules"},
)

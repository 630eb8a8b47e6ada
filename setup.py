"""Package discovery: setuptools' pyproject tables cannot combine `find` with one mapped package (models/ ->
vae_engine.shipped), so the list is computed here. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["vae_engine", "vae_engine.*"]), "vae_engine.shipped"])

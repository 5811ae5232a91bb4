# The package metadata lives in pyproject.toml; setup.py is where the compiled extension will be driven from.
from setuptools import setup

setup()

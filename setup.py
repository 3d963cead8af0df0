"""Build hooks beyond pyproject.toml. Today: none (pure Python); the optional CUDA extension plugs in here."""

from setuptools import setup

setup()

"""Builds the optional C loops (sparsestitch/_native.c); everything else is in pyproject.toml.

Where no C compiler is present the build is skipped with a warning and sparsestitch runs
its numpy code (the same results, slower).
"""

import sys

from setuptools import Extension, setup

# No fused multiply-add and no fast-math: the C loops must round exactly as numpy does.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(ext_modules=[Extension("sparsestitch._native", ["sparsestitch/_native.c"],
                             extra_compile_args=FLAGS, optional=True)])

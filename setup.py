# The C extension is declared here; all other metadata is in pyproject.toml.
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "shmring._core",
    sources=["src/shmring/_core.c"],
    depends=["src/shmring/_layout.h"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
)])

# The C extension is declared here; all other metadata is in pyproject.toml.
#
# SHMRING_SANITIZE=1 pip install -e .   builds it with AddressSanitizer and
# UndefinedBehaviorSanitizer (see docs/design.md, "Building and checking the
# C core"); run the tests with the ASan runtime preloaded.
import glob
import os

from setuptools import Extension, setup

CORE = "src/shmring/_core"
compile_args = ["-O2", "-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
                "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
link_args = []
if os.environ.get("SHMRING_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
    compile_args = [a for a in compile_args if a != "-O2"] + ["-O1"] + san
    link_args += san

setup(ext_modules=[Extension(
    "shmring._core",
    sources=sorted(glob.glob(f"{CORE}/*.c")),
    depends=sorted(glob.glob(f"{CORE}/*.h")) + ["src/shmring/_layout.h"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)])

"""Install tiered_routing (library) and tasks (SeqIO task definitions).

Supported: Python 3.11, 3.12 and 3.13. install_requires gives compatible
ranges (lower bound: the versions tested on 3.11; upper bound: the next
release series, not tested). The exact, tested versions of every package,
transitive ones included, live in one constraints file per Python version:

  3.11: constraints.txt        (pip install -e . -c constraints.txt)
  3.12: constraints-py312.txt
  3.13: constraints-py313.txt

jax >= 0.11 has no Python 3.11 wheels, so 3.11 stays on jax 0.10.
tests/test_packaging.py checks that every constraints file pins each
requirement below to a version inside its range.
"""

import setuptools

JAX_RANGE = ">=0.10.2,<0.12"

setuptools.setup(
    name="tiered_routing",
    version="0.1.0",
    description=("Mixture-of-Experts language models with tiered routing: "
                 "unlearnability vs utility across 16 languages."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    packages=setuptools.find_packages(include=["tiered_routing*", "tasks*"]),
    package_data={
        "tiered_routing": [
            "data/udhr16/*",
            "data/debian16/*",
            "data/debian16/LICENSES/*",
            "data/*.model",
        ]
    },
    install_requires=[
        "absl-py>=2.5.1,<3",
        "clu>=0.0.12,<0.1",
        "etils>=1.15.0,<2",
        "flax>=0.12.8,<0.13",
        "gin-config>=0.5.0,<0.6",
        f"jax{JAX_RANGE}",
        f"jaxlib{JAX_RANGE}",
        "matplotlib>=3.11.2,<4",
        "numpy>=2.4.6,<3",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "scipy>=1.17.1,<2",
        "sentencepiece>=0.2.3,<0.3",
        "seqio>=0.0.20,<0.1",
        "tensorboard>=2.21.0,<3",
        "tensorflow>=2.21.0,<3",
        "tensorflow-datasets>=4.9.10,<5",
        "tensorflow-text>=2.21.1,<3",
    ],
    extras_require={
        "test": ["pytest>=9.0.3,<10", "pytest-xdist>=3.8.0,<4"],
        "tpu": [f"jax[tpu]{JAX_RANGE}"],
        "gpu": [f"jax[cuda12]{JAX_RANGE}"],
    },
)

"""Install tiered_routing (library) and tasks (SeqIO task definitions).

Versions are pinned to a set known to resolve and work together on Python
3.11; constraints.txt pins the transitive dependencies as well.
"""

import setuptools

JAX_VERSION = "0.10.2"

setuptools.setup(
    name="tiered_routing",
    version="0.1.0",
    description=("Mixture-of-Experts language models with tiered routing: "
                 "unlearnability vs utility across 16 languages."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
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
        "absl-py==2.5.1",
        "clu==0.0.12",
        "etils==1.15.0",
        "flax==0.12.8",
        "gin-config==0.5.0",
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "matplotlib==3.11.2",
        "numpy==2.4.6",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "scipy==1.17.1",
        "sentencepiece==0.2.3",
        "seqio==0.0.20",
        "tensorboard==2.21.0",
        "tensorflow==2.21.0",
        "tensorflow-datasets==4.9.10",
        "tensorflow-text==2.21.1",
    ],
    extras_require={
        "test": ["pytest==9.0.3", "pytest-xdist==3.8.0"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "gpu": [f"jax[cuda12]=={JAX_VERSION}"],
    },
)

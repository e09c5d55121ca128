"""clipjax: CLIP-style contrastive image-text pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="clipjax",
    version="0.1.0",
    description="JAX/Flax framework for CLIP-style contrastive image-text pretraining",
    python_requires=">=3.11",
    packages=find_packages(include=["clipjax", "clipjax.*"]),
    package_data={
        "clipjax": ["data/assets/*", "evaluate/assets/*", "evaluate/suites/*", "search/static/*"]
    },
    # Ranges this code is known to work in; constraints.txt holds the exact tested set that `make`
    # installs. Upper bounds stop at the first release not yet run (jax 0.11 ran on a GPU).
    install_requires=[
        "jax>=0.4.35,<0.12",
        "jaxlib>=0.4.35,<0.12",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-cpu>=2.17,<3",
        "tensorflow-datasets>=4.9.7,<5",
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        "pillow>=10.0",
        "safetensors>=0.4",
        "importlib_resources>=6.0",
        "ftfy>=6.1",
        "regex>=2023.0",
        "tqdm>=4.66",
        "absl-py>=2.0",
        # search: approximate indexes, and `search serve` (ASGI toolkit, server, uploads)
        "faiss-cpu>=1.8,<2",
        "starlette>=0.40,<2",
        "uvicorn>=0.30,<1",
        "python-multipart>=0.0.9",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "transformers==4.57.6",
            "ruff==0.17.6",  # `make lint`; formatting differs between ruff versions
            "scikit-learn>=1.3",  # the linear probe's reference in tests only
            "selenium>=4.20,<5",  # the search page's browser test (Debian's chromium-driver)
        ],
        # Accelerators: jax's own CUDA (12 or 13) and TPU plugins, same version as jax.
        "cuda": ["jax[cuda13]"],
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # benchmarks/train_step.py --compare open_clip (not installed by `make test`).
        "bench": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "open_clip_torch==3.3.0",
        ],
    },
)

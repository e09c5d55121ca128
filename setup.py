"""clipjax: CLIP-style contrastive image-text pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="clipjax",
    version="0.1.0",
    description="JAX/Flax framework for CLIP-style contrastive image-text pretraining",
    python_requires=">=3.11",
    packages=find_packages(include=["clipjax", "clipjax.*"]),
    package_data={"clipjax": ["data/assets/*", "evaluate/assets/*", "evaluate/suites/*"]},
    install_requires=[
        "jax>=0.4.35",
        "jaxlib>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.17",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "safetensors>=0.4",
        "importlib_resources>=6.0",
        "ftfy>=6.1",
        "regex>=2023.0",
        "tqdm>=4.66",
        "absl-py>=2.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "transformers==4.57.6",
            "ruff==0.17.6",  # `make lint`; formatting differs between ruff versions
            "scikit-learn>=1.3",  # the linear probe's reference in tests only
        ],
        # benchmarks/train_step.py --compare open_clip (not installed by `make test`).
        "bench": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "open_clip_torch==3.3.0",
        ],
    },
)

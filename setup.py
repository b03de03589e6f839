from setuptools import setup

setup(
    name="consistency-models",
    version="0.1.0",
    description="EDM diffusion teachers and consistency models for CIFAR-10 (PyTorch)",
    packages=["cm", "cm.formats", "cm.metrics", "cm.tools"],
    python_requires=">=3.9",
    install_requires=[
        "torch",
        "numpy",
        "mpi4py",
        "blobfile",
        "pillow",
        "tqdm",
        # reads OpenAI's JAX/Flax CIFAR-10 checkpoints (cm/flax_msgpack.py) without JAX
        "msgpack",
    ],
    extras_require={
        # scipy: reference matrix square root in the FID tests;
        # scikit-learn: the 8x8 digits dataset used as real images in tests/demo;
        # matplotlib: scripts/plot_progress.py and the demo's curves (never the training scripts).
        "test": ["pytest", "scipy", "scikit-learn", "matplotlib"],
        "demo": ["scikit-learn", "matplotlib"],
        "plot": ["matplotlib"],
    },
)

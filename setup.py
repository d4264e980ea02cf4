#!/usr/bin/env python
"""d2_involution: involution and RedNet for Detectron2.

Detectron2 itself is not on the package registry; install it first (tools/setup.sh does it).
"""

from setuptools import find_packages, setup

setup(
    name="d2_involution",
    version="0.1.0",
    description="Involution (CVPR'21) and the RedNet family, native to Detectron2",
    python_requires=">=3.9",
    packages=find_packages(include=("d2_involution", "d2_involution.*")),
    package_data={"d2_involution.ops": ["*.cu", "*.cuh", "*.cpp"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "opencv-python-headless",
        "numpy",
        "Pillow",
    ],
    extras_require={
        "cuda": ["cupy-cuda13x>=13"],
        "cuda12": ["cupy-cuda12x>=13"],
        "dev": ["pytest>=7", "black", "isort", "flake8", "onnx", "onnxruntime"],
    },
)

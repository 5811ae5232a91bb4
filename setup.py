"""Package metadata lives in pyproject.toml; this file builds the optional CUDA extension sinkhorn_kernels._C with
CMake (CMakeLists.txt) wherever nvcc exists. Without nvcc (or with SINKHORN_KERNELS_NO_CUDA=1) the package installs
without it, and `sinkhorn_kernels.available_backends()` says why the 'cuda' backend is missing.
Architectures: SINKHORN_KERNELS_CUDA_ARCHS (default "80;90")."""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    cuda_home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    candidates = [shutil.which('nvcc')] + ([os.path.join(cuda_home, 'bin', 'nvcc')] if cuda_home else [])
    return next((c for c in candidates if c and os.path.exists(c)), None)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        nvcc = find_nvcc()
        if os.environ.get('SINKHORN_KERNELS_NO_CUDA') == '1' or nvcc is None:
            print('sinkhorn-kernels: no nvcc found (or SINKHORN_KERNELS_NO_CUDA=1): installing without the CUDA '
                  'extension; the reference and triton backends are unaffected')
            return
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), 'cmake')
        generator = ['-G', 'Ninja'] if shutil.which('ninja') else []
        archs = os.environ.get('SINKHORN_KERNELS_CUDA_ARCHS', '80;90')
        subprocess.run(['cmake', '-S', ROOT, '-B', build_dir, *generator, '-DCMAKE_BUILD_TYPE=Release',
                        f'-DCMAKE_CUDA_COMPILER={nvcc}', f'-DCMAKE_CUDA_ARCHITECTURES={archs}',
                        f'-DPython_EXECUTABLE={sys.executable}', f'-DSK_OUTPUT_DIR={out_dir}'], check=True)
        subprocess.run(['cmake', '--build', build_dir, '--parallel'], check=True)


setup(ext_modules=[Extension('sinkhorn_kernels._C', sources=[])], cmdclass={'build_ext': CMakeBuild})

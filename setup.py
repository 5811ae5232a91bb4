"""Package metadata lives in pyproject.toml; this file builds the extensions with CMake (CMakeLists.txt): the CPU
kernels sinkhorn_kernels._cpu always (a C++17 compiler), the CUDA extension sinkhorn_kernels._C wherever nvcc
exists. Without nvcc (or with SINKHORN_KERNELS_NO_CUDA=1) the package installs without _C, and
`sinkhorn_kernels.available_backends()` says why the 'cuda' backend is missing.
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
        if getattr(self, 'built', False):  # one CMake build makes every extension
            return
        self.built = True
        nvcc = find_nvcc()
        if os.environ.get('SINKHORN_KERNELS_NO_CUDA') == '1' or nvcc is None:
            print('sinkhorn-kernels: no nvcc found (or SINKHORN_KERNELS_NO_CUDA=1): building without the CUDA '
                  'extension; the reference and triton backends are unaffected')
            cuda = ['-DSK_WITH_CUDA=OFF']
        else:
            archs = os.environ.get('SINKHORN_KERNELS_CUDA_ARCHS', '80;90')
            cuda = ['-DSK_WITH_CUDA=ON', f'-DCMAKE_CUDA_COMPILER={nvcc}', f'-DCMAKE_CUDA_ARCHITECTURES={archs}']
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), 'cmake')
        generator = ['-G', 'Ninja'] if shutil.which('ninja') else []
        subprocess.run(['cmake', '-S', ROOT, '-B', build_dir, *generator, '-DCMAKE_BUILD_TYPE=Release', *cuda,
                        f'-DPython_EXECUTABLE={sys.executable}', f'-DSK_OUTPUT_DIR={out_dir}'], check=True)
        subprocess.run(['cmake', '--build', build_dir, '--parallel'], check=True)


setup(ext_modules=[Extension(f'sinkhorn_kernels.{name}', sources=[]) for name in ('_cpu', '_C')],
      cmdclass={'build_ext': CMakeBuild})

import os

# Tests run Triton kernels under the CPU interpreter; this must be set before any module applies @triton.jit.
os.environ.setdefault("TRITON_INTERPRET", "1")

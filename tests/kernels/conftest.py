"""Run the Triton kernels on CPU through Triton's interpreter.

`triton.jit` picks interpreter vs compiler when a kernel is decorated, i.e. when kvrelay.kernels is
first imported, so the variable must be set before that; conftest.py is loaded before this folder's
test modules are collected.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

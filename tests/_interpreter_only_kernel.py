"""A Triton kernel that runs in the interpreter but cannot compile for a GPU (used by
tests/test_gpu_compile.py to show that the AOT check fails such a kernel)."""
import triton
import triton.language as tl


def _double(x):  # plain Python, not @triton.jit: fine in the interpreter, rejected by the compiler
    return x * 2


@triton.jit
def interpreter_only_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, _double(tl.load(x_ptr + offs, mask=mask)), mask=mask)


AOT_CONFIGS = [dict(name="interpreter_only_kernel", kernel=interpreter_only_kernel,
                    signature={"x_ptr": "*fp32", "n": "i32"}, constexprs={"BLOCK": 16}, num_warps=1, num_stages=1)]

"""The routed experts' grouped matrix multiply, as a custom op that torch.compile can trace and differentiate.

`grouped_linear(x_ND, w_EDF, counts_E)` multiplies rows of x grouped by expert (the first counts_E[0]
rows belong to expert 0, the next counts_E[1] to expert 1, ...) by that expert's w [D, F]: one
`torch._grouped_mm` kernel where torch has it for the device and dtype, else a loop over the busy
experts (also taken when most experts are idle, as in decoding). Eagerly it is plain torch ops with
their own autograd; under torch.compile it is the opaque op `seekling::grouped_linear`, whose
backward (one grouped product for the input, one for the weights) is registered here.

    python -c "import torch; from seekling.ops import grouped_linear; \
               print(grouped_linear(torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([2, 3])).shape)"
"""

from __future__ import annotations

import torch

_GROUPED_MM_OK: dict[str, bool] = {}  # "device:dtype" -> whether torch._grouped_mm ran there


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The eager grouped product: [N, D] rows grouped by expert times w [E, D, F] -> [N, F]."""
    key = f"{x_ND.device.type}:{x_ND.dtype}"
    few_rows = x_ND.shape[0] < 4 * w_EDF.shape[0]  # decoding: most experts idle, skip them outright
    if not few_rows and _GROUPED_MM_OK.get(key, True) and hasattr(torch, "_grouped_mm"):
        try:
            return torch._grouped_mm(x_ND, w_EDF, offs=counts_E.cumsum(0).to(torch.int32))
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_OK[key] = False
    chunks = torch.split(x_ND, counts_E.tolist())
    return torch.cat([chunk @ w_EDF[e] for e, chunk in enumerate(chunks) if chunk.shape[0]])


@torch.library.custom_op("seekling::grouped_linear", mutates_args=())
def grouped_linear_op(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` as one opaque op with autograd, so torch.compile traces a step around it."""
    return grouped_mm(x_ND, w_EDF.contiguous(), counts_E)


@grouped_linear_op.register_fake
def _(x_ND, w_EDF, counts_E):
    return x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])


def _grouped_weight_grad(x_ND: torch.Tensor, grad_NF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """d loss / d w[e] = x_e^T @ grad_e for every expert e (zero for idle experts)."""
    try:
        return torch._grouped_mm(x_ND.t(), grad_NF, offs=counts_E.cumsum(0).to(torch.int32))
    except (RuntimeError, NotImplementedError, AttributeError):
        splits = counts_E.tolist()
        return torch.stack([xe.t() @ ge for xe, ge in zip(torch.split(x_ND, splits), torch.split(grad_NF, splits))])


@torch.library.custom_op("seekling::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad_op(x_ND: torch.Tensor, grad_NF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return _grouped_weight_grad(x_ND, grad_NF.contiguous(), counts_E)


@_grouped_weight_grad_op.register_fake
def _(x_ND, grad_NF, counts_E):
    return x_ND.new_empty(counts_E.shape[0], x_ND.shape[1], grad_NF.shape[1])


def _grouped_linear_setup(ctx, inputs, output):
    x_ND, w_EDF, counts_E = inputs
    ctx.save_for_backward(x_ND, w_EDF, counts_E)


def _grouped_linear_backward(ctx, grad_NF):
    x_ND, w_EDF, counts_E = ctx.saved_tensors
    grad_x = grouped_linear_op(grad_NF.contiguous(), w_EDF.transpose(1, 2), counts_E)
    grad_w = _grouped_weight_grad_op(x_ND, grad_NF, counts_E)
    return grad_x, grad_w, None


grouped_linear_op.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup)


def grouped_linear(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """x rows grouped by expert (counts_E rows each) times that expert's w [D, F]: the op under torch.compile."""
    if torch.compiler.is_compiling():
        return grouped_linear_op(x_ND, w_EDF, counts_E)
    return grouped_mm(x_ND, w_EDF, counts_E)

"""DoRA's column norm for training, without a dense copy of the base weight.

DoRA scales each output row i of a linear layer by m_i / ||W_i + s (BA)_i||. PEFT computes
that norm on every forward pass from dense matrices: it dequantizes W, builds BA through an
identity matrix, adds them in the input's dtype (fp32 after prepare_model_for_kbit_training)
and reduces: several full-size passes over every target weight for each micro-batch, which
for Phi-4-mini costs as much time as the matrix products of a short batch. Expanding the
square gives the same norm from small or constant pieces:

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

||W_i||^2 is computed once, since the base weight is frozen; W A^T is the base layer applied
to the r rows of A (a skinny product that bitsandbytes runs on the 4-bit weight directly);
A A^T is r x r. Everything else about DoRA is PEFT's: the same formula for the output, the
norm detached from the graph (DoRA paper, section 4.3), the extra base-layer pass on the
dropped-out input when lora_dropout > 0, and PEFT's merge, unmerge and state dict.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight

SQUARED_NORM = "base_squared_norm"


class FactoredNormDora(DoraLinearVariant):
    """PEFT's DoRA for linear layers, with the norm computed as in the module docstring."""

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        base_layer = module.get_base_layer()
        if isinstance(dropout, torch.nn.Identity) or not module.training:
            base_result = result
        else:
            # As in PEFT, the base weight's share of the update sees the dropped-out input too.
            x = dropout(x)
            base_result = base_layer(x)
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias
        with torch.no_grad():
            norm = _column_norm(module, active_adapter)
        magnitude = module.lora_magnitude_vector[active_adapter].weight
        scale = (magnitude / norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        # result + (scale - 1) * base_result + scale * scaling * lora_result, in two passes
        # over the output instead of five.
        return torch.addcmul(result, base_result, scale - 1).addcmul_(lora_result, scale * scaling)


def _column_norm(module: LoraLayer, adapter: str) -> torch.Tensor:
    """||W_i + s (BA)_i|| for every output row i, in fp32."""
    A = module.lora_A[adapter].weight
    B = module.lora_B[adapter].weight.float()
    base_layer = module.get_base_layer()
    weight_a = base_layer(A.to(_input_dtype(base_layer)))  # rows of A W^T (+ bias)
    if base_layer.bias is not None:
        weight_a = weight_a - base_layer.bias
    with torch.autocast(A.device.type, enabled=False):
        A = A.float()
        cross = (B * weight_a.float().T).sum(dim=1)
        lora = ((B @ (A @ A.T)) * B).sum(dim=1)
        scaling = module.scaling[adapter]
        squared = getattr(module.lora_magnitude_vector[adapter], SQUARED_NORM)
        return (squared + 2 * scaling * cross + scaling**2 * lora).clamp_min(0).sqrt()


def _input_dtype(base_layer: torch.nn.Module) -> torch.dtype:
    # bitsandbytes layers compute in compute_dtype; a plain Linear in its weight's dtype.
    return getattr(base_layer, "compute_dtype", None) or base_layer.weight.dtype


def use_factored_norm(model: torch.nn.Module) -> int:
    """Switch every DoRA linear layer of a PEFT model to `FactoredNormDora`; returns how many.

    Stores ||W_i||^2 (fp32, not part of any state dict) beside each magnitude vector.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, variant in list(module.lora_variant.items()):
            if type(variant) is not DoraLinearVariant or module.fan_in_fan_out:
                continue
            weight = dequantize_module_weight(module.get_base_layer())
            with torch.no_grad():
                squared = weight.float().pow(2).sum(dim=1)
            module.lora_magnitude_vector[adapter].register_buffer(
                SQUARED_NORM, squared, persistent=False
            )
            module.lora_variant[adapter] = FactoredNormDora()
            count += 1
    return count

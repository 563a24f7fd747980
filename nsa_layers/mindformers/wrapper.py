"""``NSATrainOneStepCell``: MindFormers' train wrapper for NSA models, on every device."""

import mindspore as ms
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell
from mindspore import nn
from mindspore.ops import functional as F

from .cpu import on_cpu

__all__ = ["NSATrainOneStepCell"]


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class NSATrainOneStepCell(MFTrainOneStepCell):
    """MindFormers' ``MFTrainOneStepCell`` (same arguments, same outputs) that also runs on CPU.

    MindSpore's loss-scale wrapper treats every non-GPU device as Ascend and reads the NPU float
    status; on CPU this wrapper checks gradients with ``IsFinite`` instead (MindSpore's own
    "INFNAN" branch). On every device it takes the loss and the gradients from one differentiated
    forward (``value_and_grad``) where ``MFTrainOneStepCell`` runs the network once for the loss and
    again inside ``GradOperation``: with the NSA core's graph loops in the model, MindSpore 2.9 then
    pairs the backward with the wrong parameter keys and every gradient comes out zero (the bug and
    its reproduction: ``docs/design.md``). Use it in a YAML as ``runner_wrapper: {type:
    NSATrainOneStepCell, ...}``.
    """

    def __init__(self, network, optimizer, **kwargs):
        super().__init__(network, optimizer, **kwargs)
        self.overflow_check = "npu-status"
        if on_cpu():
            self.gpu_target = False
            self.ascend_910b_target = True
            self._ascend_check_overflow_mode = "INFNAN_MODE"
            self.enable_allfinite = False
            self.overflow_check = "isfinite"
        self.scaled_objective = _ScaledObjective(self.network, self.calculate_per_token_loss)
        self.objective_and_grads = ms.value_and_grad(self.scaled_objective, None, self.weights, has_aux=True)

    def grads_for_mcore(self, scaling_sens, *inputs):
        """``MFTrainOneStepCell.grads_for_mcore`` (same results: loss, gradients of the summed losses
        times ``scaling_sens``, the scale factor) from one differentiated forward."""
        values, grads = self.objective_and_grads(self.cast(scaling_sens, ms.float32), *inputs)
        if self.calculate_per_token_loss:
            denominator = values[2]
            lm_loss, mtp_loss = values[1] / denominator, values[3] / denominator
            aux_loss, indexer_loss = values[5] / denominator, values[6] / denominator
            grad_scale_factor = denominator
        else:
            lm_loss, mtp_loss, aux_loss, indexer_loss = values[1], values[2], values[3], values[4]
            grad_scale_factor = self.grad_scale_factor
        loss = lm_loss + aux_loss + indexer_loss
        loss = loss + mtp_loss
        if self.print_separate_loss:
            F.assign_add(self.indexer_loss_parameter, indexer_loss / self.total_num_layers)
            F.assign_add(self.aux_loss_parameter, aux_loss / self.aux_loss_scale if self.aux_loss_scale > 0 else 0)
            F.assign_add(self.mtp_loss_parameter, mtp_loss)
            F.assign_add(self.lm_loss_parameter, lm_loss)
        return loss, grads, grad_scale_factor


class _ScaledObjective(nn.Cell):
    """What ``MFTrainOneStepCell`` differentiates, as one output: the sum of the losses it gives sens
    ``scaling_sens`` to (the denominators get 0), times ``scaling_sens``; then the network's outputs."""

    def __init__(self, network, per_token):
        super().__init__(auto_prefix=False)
        self.network = network
        self.per_token = per_token

    def construct(self, scaling_sens, *inputs):
        outputs = self.network(*inputs)
        if self.per_token:  # (numerator0, denominator0, numerator1, denominator1, aux_loss, indexer_loss)
            objective = outputs[0] + outputs[2] + outputs[4] + outputs[5]
        else:  # (lm_loss, mtp_loss, aux_loss, indexer_loss)
            objective = outputs[0] + outputs[1] + outputs[2] + outputs[3]
        return (objective * scaling_sens,) + tuple(outputs)

"""bitsandbytes' 8-bit AdamW, stepping without a GPU synchronisation per parameter.

`bitsandbytes.optim.Optimizer8bit.step` calls torch.cuda.synchronize() after updating each
parameter. A DoRA adapter of Phi-4-mini has 384 of them, so every optimizer step waited for
the GPU 384 times: on an H100 the step took about 0.17 s, a third of a whole training step
of 16 Code Alpaca examples (docs/performance.md). The updates are ordinary kernels on the
current stream, run in the same order either way, so dropping the waits changes no number.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch


class AdamW8bit(bnb.optim.AdamW8bit):
    """`bnb.optim.AdamW8bit` (paged when `is_paged`) with `step` minus the per-parameter sync."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if not self.state[param]:
                    self.init_state(group, param, gindex, pindex)
                self.prefetch_state(param)
                self.update_step(group, param, gindex, pindex)
        if self.is_paged and torch.cuda.is_available():
            # Paged state moves asynchronously; bitsandbytes waits once at the end too.
            torch.cuda.synchronize()
        return loss

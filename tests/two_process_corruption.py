"""Launched by test_multiprocess.py on two processes: does each process draw its own corruption?"""

import json
import sys

import torch
from accelerate import Accelerator

from ssvit.objectives.masked_patch import corrupt
from ssvit.train import seed_process

accelerator = Accelerator(cpu=True)
seed_process(0)  # what the training loop does before its first step
_, selected, _, _ = corrupt(torch.zeros(8, 16, 4), torch.zeros(4), 0.5, 0.8, 0.1)
everyone = accelerator.gather(selected[None].long())
if accelerator.is_main_process:
    out = {"num_processes": accelerator.num_processes, "same": bool(torch.equal(everyone[0], everyone[-1]))}
    open(sys.argv[1], "w").write(json.dumps(out))
# Leave together: a process that exits while the other still talks to gloo aborts ("terminate called without an
# active exception"), which failed CI once.
accelerator.wait_for_everyone()
accelerator.end_training()

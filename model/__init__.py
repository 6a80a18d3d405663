"""Single-device model code: the MTP head, the frozen target, the loss, export names.

Nothing here knows about accelerate or DeepSpeed; `train/` wires these together.
"""

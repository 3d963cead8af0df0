"""Bridges to other libraries and continual-learning codebases.

    peft_bridge   the pool layer as a peft LoRA layer (LoraConfig with a custom module mapping)
    hooks         begin_task / loss_extra / end_task as functions of the model, for any trainer's hooks
    avalanche     an Avalanche SupervisedPlugin
    mammoth       a Mammoth-style ContinualModel

Each submodule imports its library when it is imported itself: `import rank1_kernels` never needs peft, Avalanche
or Mammoth.
"""

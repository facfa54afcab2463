"""lora_fast benchmark suite: ``python -m bench`` (see bench/README.md).

Importing this package is cheap: nothing touches the GPU, bitsandbytes or PEFT until a run starts.
"""

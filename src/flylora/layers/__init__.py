"""Pure-PyTorch adapter layers. Nothing here imports PEFT, data or training code."""

"""Compiling the model's programs for GPUs this machine does not have, to size and check them."""

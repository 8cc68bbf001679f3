"""Worker scripts that tests/test_distributed_engines.py launches with torchrun or accelerate."""

"""`python -m onnx_forget` runs the command line."""

from .cli import main

main()

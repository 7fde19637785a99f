"""`python -m bench ...` (also under torchrun) is the same as the `bench` command."""
from .cli import main

main(prog_name="bench")

"""`python -m fermion` (and `torchrun -m fermion ...`)."""

from fermion.cli import main

main()

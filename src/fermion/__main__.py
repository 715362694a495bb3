"""`python -m fermion` (and `torchrun -m fermion ...`)."""

from fermion.cli import main

if __name__ == "__main__":  # spawned worker processes re-import this module and must not run the CLI
    main()

"""`python -m lors_fast.cli` (e.g. under torchrun) == the `lors-fast` command."""

from lors_fast.cli import main

if __name__ == "__main__":
    main()

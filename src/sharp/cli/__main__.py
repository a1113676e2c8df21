"""`python -m sharp.cli ...` (and `torchrun -m sharp.cli` / `accelerate launch -m sharp.cli`): the `sharp` command
without its console script."""

from sharp.cli import main

if __name__ == "__main__":
    main()

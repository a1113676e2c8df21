"""`python -m sharp.cli ...`: the `sharp` command without its console script (also `accelerate launch -m sharp.cli`)."""

from sharp.cli import main

if __name__ == "__main__":
    main()

"""`python -m flows.cli ...`: the same entry point as the `instaflow` console script."""

from flows.cli.main import main

main()

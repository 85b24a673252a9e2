"""`python -m dynq.cli`: the `dynq` command."""

from dynq.cli import main

main()

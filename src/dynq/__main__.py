"""`python -m dynq`: the `dynq` command."""

from dynq.cli import main

main()

"""`python -m anyquant.cli`."""

from anyquant.cli import main

main()

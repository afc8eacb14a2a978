"""``python -m actcap``: the command line."""

from actcap.cli.main import main

main()

"""The `kvport` command. One module per subcommand, each with `add_arguments(parser)` and `run(args) -> int`.
This package must not import torch or any subcommand's dependencies until that subcommand runs."""

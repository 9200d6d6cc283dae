"""One module per `dq` subcommand: add_arguments(parser) and run(args)."""

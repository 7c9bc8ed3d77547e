"""The command line, `authopt`: the roof floor. It reads the environment, builds the typed settings
and starts the parts below it (server, streams worker, broker, simulator, training, evaluation)."""

"""The parameter server, one shard of it per process: the protocol shell that checks and
batches pushes and answers pulls (`parameter_server`), the pure jitted apply of a batch of
pushes to its slice (`shard_state`), its files and statistics (`server_stats`), and the
process that binds, restores, serves and leaves the final slice (`process`)."""

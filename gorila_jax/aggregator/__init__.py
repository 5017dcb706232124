"""An aggregator, one per host with `--aggregate-per-host`: the host's bundles push to it and
pull from it, and it forwards the mean of their gradients to the server's shards, one push
per shard at a time (`aggregator`), and the process that binds, meets the shards and serves
(`process`)."""

"""A bundle: actors, replay and learner in one loop (`loop`), the client through which its
learner pushes gradients to the server's shards and pulls their params (`client`), and the
checkpoint of its replay and counters (`replay_checkpoint`)."""

"""A bundle: actors, replay and learner in one loop (`loop`), the learner that computes its
gradient for the server (`remote_learner`), the client, with no JAX, that pushes gradients
to the server's shards and pulls their params (`client`), the checkpoint of its replay and
counters (`replay_checkpoint`), and the process that runs it all (`process`)."""

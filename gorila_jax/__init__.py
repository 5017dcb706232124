"""gorila_jax: Gorila DQN with a parameter server, in functional JAX.

The folders follow the route of one gradient, and import one way, each only from those
above it in this list (tests/test_layout.py checks it):

- `core`: the pure part, shared by every role: the config, the Q-network, the DQN loss
  and its gradient, the optimizers and DC-ASGD, the policy, the replay memory, how the
  parameter vector is cut into server slices and gradient parts, the learner step a sync
  run's processes take together (jax's collectives). No processes, no sockets.
- `envs`: the environments (envpool Atari, gymnasium CartPole) and their recordings.
- `io`: what a run writes and reads: atomic files, checkpoints, params files, metrics,
  the log format.
- `wire`: what crosses a process boundary: the ZeroMQ transport and the rendezvous.
- `server`: the parameter server (one shard of it): its protocol shell, its pure jitted
  apply, its statistics, and the process that serves.
- `bundle`: actors, replay and learner in one loop, the learner that computes a
  gradient for the server, the client (no JAX) that pushes it to the server's shards and
  pulls their params, and the process that runs a bundle.
- `aggregator`: one per host with `--aggregate-per-host`: the server of the host's
  bundles and one worker of the shards, forwarding the mean of their gradients.
- `run`: what a user starts: the entry point that picks a role, the local launcher, the
  single process, the processes of a sync run, evaluation, plots. Nothing imports it.
"""

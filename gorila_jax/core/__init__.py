"""The pure core: what every role computes, with no process, socket or file of its own.

The config and its validation (`config`, `cli`, `env_ids`), the Q-networks (`networks`,
`model`), the DQN loss, targets and jitted steps (`learner`), the optimizers and DC-ASGD
(`optim`), the epsilon-greedy policy (`actor`), the replay memory (`replay`, `sum_tree`),
and how the flat parameter vector is cut into server slices (`shard_layout`) and a
bundle's gradient parts (`gradient_parts`). It imports nothing else from the package.
"""

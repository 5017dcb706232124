"""gorila_jax: Gorila DQN with a parameter server, in functional JAX."""

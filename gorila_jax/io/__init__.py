"""What a run writes and reads on disk and in its log: atomic files and private run
directories (`files`), the run's config.yaml (`config_file`), orbax checkpoints of a
server or learner (`checkpoint`), params files (`params_file`), learner metrics and the
progress line (`metrics`), the log format (`logs`)."""

"""What a user starts: the entry point that gives a process its role (`launch`), a single
process with no server (`single_process`), and the evaluation of saved params
(`evaluate`). Nothing in the package imports this folder."""

"""The experiment: the command line, a session over a plan, the executors that run its jobs."""

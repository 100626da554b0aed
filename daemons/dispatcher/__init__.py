"""The dispatcher daemon and its policies.

Jobs are DAGs of dependent tasks. The dispatcher keeps them in a durable store;
workers pull tasks. Which worker gets a task is a *dispatch policy*
(:mod:`shoal.core.dispatch.policy`), and in which order a worker runs its
local queue is a *queue policy*. The same policy classes run live and in the
discrete-event simulator (:mod:`shoal.core.dispatch.sim`), which reproduces
the experiments of seed 004 (DAMD).
"""

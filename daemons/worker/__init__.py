"""The worker daemon: pulls units from the dispatcher and runs each task in its own process."""

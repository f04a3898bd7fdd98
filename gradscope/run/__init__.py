"""Running the user's training: the Experiment contract and its one training step, the target loader,
the profile run (diagnose), the trials and their schedule, captured state, and the Clipper that
applies the advice with its guards.
"""

"""Agents: the teacher solves checkable tasks with a Python tool run in a sandbox; verified
trajectories are captured (with a per-token role mask) and distilled into a student."""

"""Routing simulation: calibrated sim engine presets, workloads, a discrete-event
simulator that drives the production policy and index code, baseline policies, and the
``kvfleet bench routing`` command."""

"""Turning noise into a MagiHuman latent: clip sizes, flow schedules and solvers, the distilled and guided
sampling loops, latent super-resolution, and the stage functions (with their request objects) that the
nodes and the command line call.

May import ``..dit``, ``..codecs``, ``..media``, ``..weights`` and ``...fp8``; never the runner or the demo.
"""

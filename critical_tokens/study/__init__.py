"""A study: what a preset describes (models, experiments, their hyper-parameters) and the
``reproduce`` command runs (docs/method.md section 7). One name in the code for what the command
calls a reproduction; an experiment is one part of a study (``levels``, ``kl_comparison``, ...,
``confirm``); the preset's JSON keys and the commands keep their names.

From the bottom up:

- `presets/`: the packaged presets (package data), ``--preset NAME``;
- `preset_fields`: a preset's sections and experiments, and their typed fields;
- `design`: a pre-registered study (the ``confirm`` experiment) as frozen `Study`, `Arm` and
  `Hypothesis` objects, with the roles, the decision rules and the default alpha, checked once
  when the preset loads and built by the plan and by the report;
- `plan`: the jobs a preset makes, each with its fully resolved config;
- `preset`: loading and checking a preset (every config of its plan built before anything runs);
- `jobs`: one job (where it stands on disk; running it in a worker);
- `launchers`: where the jobs run (local processes, Ray, SLURM).

:mod:`critical_tokens.reproduce` runs a study's plan with these, then writes its report with
:mod:`critical_tokens.report`, which reads `design` and `preset_fields` and nothing above them.
"""

"""The lab: training harness, analysis, reproduction report, data sets, models, benchmarks, CLI.

The lab uses the library (:mod:`kalmannorm`: layers, chain, conversion, folding, optimizer
groups) and is never imported by it. Inside the lab, :mod:`~kalmannorm.lab.analysis` and
:mod:`~kalmannorm.lab.reproduce` use :mod:`~kalmannorm.lab.train`, never the other way round.
"""

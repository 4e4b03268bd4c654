"""The machinery behind the book's measured claims, kept apart from the methods it measures.

Each chapter module (`dlearn.vdm`, `dlearn.controlnet`, ...) holds the method a reader of the chapter
reads. Its study module here holds what trains the shipped weights (the recipes the registry
`dlearn.zoo` runs), the protocol metrics recorded with them, and the ablation and study jobs, with
their command-line entry points, e.g. `python -m dlearn.studies.controlnet study [JOB ...]`.

A study module may import any chapter module; no chapter module imports a study module.
"""

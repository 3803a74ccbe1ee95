"""Metric code for every task, computed by the maintained libraries of the field (scikit-learn,
pycocotools), plus the plots a run directory shows. Names are `split/name` once a task prefixes them."""

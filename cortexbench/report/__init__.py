"""Reports: what a run prints and writes besides results.json.

``tables`` renders markdown and console tables and formats numbers with their units; ``single_report``
builds the tables of ``python -m cortexbench.single`` (report.md, the console summary, results.csv rows);
``single_plots`` draws its figures with matplotlib's Agg canvas (no display needed).
"""

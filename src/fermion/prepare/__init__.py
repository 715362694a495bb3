"""`fermion prepare`: data.sources -> cleaned, filtered, deduplicated documents, with a report of what left and why.

The pipeline is built from datatrove's readers, filters, dedup stages, writers and executors, with fermion's own
steps where datatrove has none. It runs as a chain of datatrove executor runs ("stages"): a clean pass per source,
exact and MinHash dedup, then a final pass per source (decontamination, perplexity). Deduplication runs across all
sources together: the same page in a web crawl and in a Wikipedia dump is one document too many, whichever source
it came from.

    readers.py   a source's files, dataset or built-in corpus -> datatrove documents; bad records counted
    steps.py     fermion's own steps: normalise, length, code rules, decontamination, perplexity, the tally
    plan.py      the preparation's folder (a hash of what it depends on), each source's steps, the stages
    runner.py    the executors (local, Slurm, Ray), the stages run in order, the report written last
    report.py    per source and step: documents in and out and why they left; --inspect's examples

Training reads the kept documents through `prepared_data`, only once the report exists.
"""

from fermion.prepare.plan import REPORT_NAME, make_plan, plan_id, prepared_data, write_input_lists
from fermion.prepare.report import add_tokens, inspect, report_table
from fermion.prepare.runner import build_stages, run

__all__ = [
    "REPORT_NAME",
    "add_tokens",
    "build_stages",
    "inspect",
    "make_plan",
    "plan_id",
    "prepared_data",
    "report_table",
    "run",
    "write_input_lists",
]

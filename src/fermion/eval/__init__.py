"""Evaluation: benchmarks scored by log-likelihood or generation, perplexity, and a smoke test.

    lm.py               the model under evaluation (scoring as lm-eval does it; generation through the engine)
    multiple_choice.py  HellaSwag, ARC, PIQA, MMLU
    generative.py       GSM8K, BBH
    ifeval.py           IFEval's verifiable instructions
    humaneval.py        HumanEval, run in a sandboxed subprocess
    tinytask.py         structured output / tool calling, optionally grammar-constrained
    perplexity.py       bits per byte on a text file
    smoke.py            12 prompts, OK/WEAK/FAIL
    runner.py           task names -> results; results.py writes results.json and results.md
"""

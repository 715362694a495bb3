"""Generated data for demos and tests: children's stories, textbook passages, arithmetic, chat, tool calls.

Everything here is made offline from templates and word lists, and everything is seeded: the same (n, seed) gives
the same records on every machine (seeded.py: each generator draws from `random.Random` seeded with a string derived
from the seed, never from the global generator or `hash()`). One module per kind:

    arithmetic.py  problems with a held-out split (one problem in five is for evaluation only), SFT records,
                   preference pairs, "Question: What is 7 + 5?\\nAnswer: 12" documents
    stories.py     TinyStories-like children's stories of 80-250 words
    textbook.py    explanatory passages of 100-300 words with worked examples and exercises (training problems only)
    chat.py        one-turn conversations: story requests, definitions, facts, small talk
    tinytask.py    tool calls: the `tinytask` eval's problems, and training conversations, pairs and documents
    seeded.py      what they share: the seeded random streams and the held-out split rule

Pretraining text (`generated_documents(name, n, seed)`, names in GENERATED_DOCUMENTS):

    stories      stories.stories(n, seed)
    textbook     textbook.textbook(n, seed)
    arithmetic   arithmetic_documents(n, seed)   the prompt format the `arithmetic` eval task uses for base models
    tinytask     tinytask.documents(n, seed)     the plain prompt a base model is evaluated on, followed by the call

Post-training records (`generated_records(name, n, seed)`, names in GENERATED_RECORDS):

    arithmetic        arithmetic_examples(n, seed)     {"prompt": "What is 17 + 3?", "completion": "20"}      (SFT)
    arithmetic-pairs  arithmetic_preferences(n, seed)  {"prompt": ..., "chosen": "20", "rejected": "21"}     (DPO)
    tinytask          tinytask.sft_records(n, seed)     {"messages": [system, user, assistant]}              (SFT)
    tinytask-pairs    tinytask.preference_records(n, seed)  {"prompt": [system, user], "chosen": the call,
                                                       "rejected": the call with one argument wrong}     (DPO)
    chat              chat.chat(n, seed)               {"messages": [user, assistant]}                        (SFT)

    write_jsonl(path, records)    one JSON object a line (gzipped when the name ends in .gz)
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from fermion.atomic import replaced_file
from fermion.data.synthetic import chat, stories, textbook, tinytask
from fermion.data.synthetic.arithmetic import (
    MAX_FACTOR,
    MAX_OPERAND,
    OPERATIONS,
    Problem,
    all_problems,
    arithmetic_documents,
    arithmetic_examples,
    arithmetic_preferences,
    arithmetic_problems,
    base_prompt,
    held_out,
    make_problem,
    qa_text,
    wrong_answer,
)

GENERATED_DOCUMENTS = ("stories", "textbook", "arithmetic", "tinytask")
GENERATED_RECORDS = ("arithmetic", "arithmetic-pairs", "tinytask", "tinytask-pairs", "chat")

__all__ = [
    "GENERATED_DOCUMENTS",
    "GENERATED_RECORDS",
    "MAX_FACTOR",
    "MAX_OPERAND",
    "OPERATIONS",
    "Problem",
    "all_problems",
    "arithmetic_documents",
    "arithmetic_examples",
    "arithmetic_preferences",
    "arithmetic_problems",
    "base_prompt",
    "generated_documents",
    "generated_records",
    "held_out",
    "make_problem",
    "qa_text",
    "write_jsonl",
    "wrong_answer",
]


def generated_documents(name: str, n: int, seed: int = 0) -> Iterator[str]:
    """n pretraining documents of one generated kind (GENERATED_DOCUMENTS)."""
    makers = {"stories": stories.stories, "textbook": textbook.textbook, "arithmetic": arithmetic_documents,
              "tinytask": tinytask.documents}
    if name not in makers:
        raise ValueError(f"unknown generated documents {name!r}; expected one of {', '.join(GENERATED_DOCUMENTS)}")
    return makers[name](n, seed)


def generated_records(name: str, n: int, seed: int = 0) -> Iterator[dict]:
    """n post-training records of one generated kind (GENERATED_RECORDS): SFT prompt/completion or messages, DPO
    prompt/chosen/rejected."""
    makers = {"arithmetic": arithmetic_examples, "arithmetic-pairs": arithmetic_preferences,
              "tinytask": tinytask.sft_records, "tinytask-pairs": tinytask.preference_records, "chat": chat.chat}
    if name not in makers:
        raise ValueError(f"unknown generated records {name!r}; expected one of {', '.join(GENERATED_RECORDS)}")
    return iter(makers[name](n, seed))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write the records one a line (gzip when the name ends in .gz), under a temporary name renamed when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with replaced_file(path) as tmp, opener(tmp, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path



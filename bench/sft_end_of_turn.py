"""Does SFT teach a model to end its answers? Greedy answers to instructions it was not trained on, before and after
SFT, counting those that end with the template's end-of-turn token within the token budget.

    python bench/sft_end_of_turn.py runs/stories-chat runs/stories-chat/sft

The instructions are Alpaca's 175 self-instruct seed tasks (../shared/data/sft/alpaca/seed_tasks.jsonl), which
are not among the SFT data of configs/stories-chat.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fermion import checkpoint
from fermion.chat.templates import ChatTemplate
from fermion.infer.engine import Engine, SamplingParams

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "alpaca" / "seed_tasks.jsonl"


def instructions(n: int) -> list[list[dict]]:
    conversations = []
    for line in SEEDS.read_text(encoding="utf-8").splitlines()[:n]:
        task = json.loads(line)
        message = {"role": "user", "content": task["instruction"]}
        if task["instances"] and task["instances"][0]["input"]:
            message["input"] = task["instances"][0]["input"]
        conversations.append([message])
    return conversations


def measure(path: str, conversations: list[list[dict]], max_new_tokens: int) -> dict:
    loaded = checkpoint.load(path)
    model, tokenizer, recipe = loaded.model, loaded.tokenizer, loaded.recipe
    template = ChatTemplate.get(recipe.tokenizer.chat_template)
    end_of_turn = tokenizer.encode(template.stop_strings[0]) if template.stop_strings else [tokenizer.eos_id]
    if len(end_of_turn) != 1:
        raise SystemExit(f"{template.name}: the end-of-turn marker is not one token; this script counts tokens")
    prompts = [template.encode(tokenizer, c, add_generation_prompt=True).ids for c in conversations]
    room = recipe.model.context_length - max_new_tokens  # instructions too long to answer in full are left out
    prompts = [p for p in prompts if len(p) < room]
    # eos is ignored so that only the end-of-turn token ends an answer: a base model trained on documents that end
    # in eos may stop there, which is not answering in the chat format.
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True,
                            stop_token_ids=end_of_turn)
    completions = Engine(model, tokenizer, max_batch=16).generate(prompts, params)
    ended = [c for c in completions if c.finish_reason == "stop"]
    return {"path": path, "answers": len(completions), "ended": len(ended),
            "mean_tokens_when_ended": sum(len(c.token_ids) for c in ended) / max(len(ended), 1),
            "example": completions[0].text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="runs or checkpoints to compare (e.g. the base, then its SFT)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args()
    conversations = instructions(args.n)
    for path in args.models:
        result = measure(path, conversations, args.max_new_tokens)
        print(f"{path}: {result['ended']}/{result['answers']} answers end with the end-of-turn token within "
              f"{args.max_new_tokens} tokens (mean length when ended: {result['mean_tokens_when_ended']:.1f} "
              f"tokens)\n  first answer: {result['example'][:200]!r}", flush=True)


if __name__ == "__main__":
    main()

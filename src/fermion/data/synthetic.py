"""Generated data for demos and tests: children's stories, textbook passages, arithmetic, tool calls.

Everything here is made offline from templates and word lists, and everything is seeded: the same (n, seed) gives
the same records on every machine (each generator draws from `random.Random` seeded with a string derived from the
seed, never from the global generator or `hash()`).

Pretraining text (`generated_documents(name, n, seed)`, names in GENERATED_DOCUMENTS):

    stories      stories(n, seed)              TinyStories-like stories of 80-250 words: six plot shapes, many
                                               sentence templates, names, animals, places, objects, feelings, morals
    textbook     textbook(n, seed)             explanatory passages of 100-300 words: addition, subtraction and
                                               times tables with worked examples and exercises, animals, water and
                                               weather, the geography of the stories' little world, definitions
    arithmetic   arithmetic_documents(n, seed) blocks of "Question: What is 7 + 5?\\nAnswer: 12" lines, the prompt
                                               format the `arithmetic` eval task uses for base models
    tinytask     tinytask's training calls, as the plain prompt a base model is evaluated on followed by the call

Post-training records (`generated_records(name, n, seed)`, names in GENERATED_RECORDS):

    arithmetic        arithmetic_examples(n, seed)     {"prompt": "What is 17 + 3?", "completion": "20"}      (SFT)
    arithmetic-pairs  arithmetic_preferences(n, seed)  {"prompt": ..., "chosen": "20", "rejected": "21"}     (DPO)
    tinytask          fermion.eval.tinytask.sft_records {"messages": [system, user, assistant]}              (SFT)
    tinytask-pairs    fermion.eval.tinytask.preference_records  {"prompt": [system, user], "chosen": the call,
                                                       "rejected": the call with one argument wrong}     (DPO)
    chat              chat(n, seed)                    {"messages": [user, assistant]}                        (SFT)
                      story requests answered with a story featuring the animal, name or trait asked for; the
                      little dictionary's definitions; the village's geography, animals and science as the
                      textbook states them; greetings and small talk (answers of at most CHAT_WORDS words)

Arithmetic is the one task where a model of a few million parameters can learn a preference that generalises, and
where the right answer is known, so a run can be checked rather than eyeballed. A problem (a, op, b) is held out
for evaluation iff a SHA-256 hash of "a op b" is 0 modulo EVAL_SHARE (one problem in five); `arithmetic_problems`
draws from one side (split="train", the default, "eval" or "all"), and every training-side generator (SFT, pairs,
the arithmetic documents and the textbook's worked examples) uses training problems only, so the `arithmetic` eval
task measures generalisation rather than recall. Default sizes (operands up to MAX_OPERAND = 20, factors up to
MAX_FACTOR = 10) are ones a tiny model can learn in minutes.

    write_jsonl(path, records)    one JSON object a line (gzipped when the name ends in .gz)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

OPERATIONS = ("+", "-", "*")
MAX_OPERAND = 20  # additions and subtractions: operands 1..MAX_OPERAND
MAX_FACTOR = 10  # multiplications: factors 2..MAX_FACTOR
EVAL_SHARE = 5  # one problem in EVAL_SHARE (by hash) is for evaluation only
SPLITS = ("train", "eval", "all")
GENERATED_DOCUMENTS = ("stories", "textbook", "arithmetic", "tinytask")
GENERATED_RECORDS = ("arithmetic", "arithmetic-pairs", "tinytask", "tinytask-pairs", "chat")


def _rng(kind: str, seed: int) -> random.Random:
    return random.Random(f"fermion.synthetic/{kind}/{seed}")


# ------------------------------------------------------------------------------------------------- arithmetic


class Problem(NamedTuple):
    question: str
    answer: int
    a: int
    op: str
    b: int


def held_out(a: int, op: str, b: int) -> bool:
    """Whether the problem `a op b` belongs to evaluation (never to training data): a stable hash of "a op b"."""
    digest = hashlib.sha256(f"{a} {op} {b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_SHARE == 0


def make_problem(a: int, op: str, b: int) -> Problem:
    return Problem(f"What is {a} {op} {b}?", _apply(a, op, b), a, op, b)


def _in_split(a: int, op: str, b: int, split: str) -> bool:
    return split == "all" or held_out(a, op, b) == (split == "eval")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = MAX_OPERAND, max_factor: int = MAX_FACTOR,
                        split: str = "train") -> Iterator[Problem]:
    """n problems: additions and subtractions of numbers up to max_operand (never below zero), and multiplications
    of numbers up to max_factor (times tables), in equal shares, drawn with replacement from one side of the
    held-out rule (split "train", "eval" or "all")."""
    _check_split(split)
    rng = _rng("arithmetic", seed)
    made = 0
    while made < n:
        op = rng.choice(OPERATIONS)
        if op == "*":
            a, b = rng.randint(2, max_factor), rng.randint(2, max_factor)
        else:
            a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
            if op == "-" and b > a:
                a, b = b, a
        if _in_split(a, op, b, split):
            made += 1
            yield make_problem(a, op, b)


def all_problems(max_operand: int = MAX_OPERAND, max_factor: int = MAX_FACTOR, split: str = "all") -> list[Problem]:
    """Every distinct problem arithmetic_problems can draw with these sizes, on one side of the split, in a fixed
    order (+, -, *; then by operands)."""
    _check_split(split)
    pairs = {"+": [(a, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)],
             "-": [(a, b) for a in range(1, max_operand + 1) for b in range(1, a + 1)],
             "*": [(a, b) for a in range(2, max_factor + 1) for b in range(2, max_factor + 1)]}
    return [make_problem(a, op, b) for op in OPERATIONS for a, b in pairs[op] if _in_split(a, op, b, split)]


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible mistake: off by one or two, off by ten (a carry or borrow gone wrong), one digit changed, the
    digits swapped, the wrong operation (+ for -, - for +, + for *), or a neighbouring line of the times table.
    Never the right answer, never negative."""
    right = problem.answer
    digits = str(right)
    candidates = {right + d for d in (-2, -1, 1, 2, -10, 10)}
    if len(digits) > 1 and digits[-1] != "0":  # a reversal with a leading zero would drop a digit
        candidates.add(int(digits[::-1]))
    position = rng.randrange(len(digits))
    allowed = "123456789" if position == 0 and len(digits) > 1 else "0123456789"
    candidates.add(int(digits[:position] + rng.choice([d for d in allowed if d != digits[position]])
                       + digits[position + 1:]))
    candidates.add(_apply(problem.a, "-" if problem.op == "+" else "+", problem.b))
    if problem.op == "*":
        candidates.update((right - problem.a, right + problem.a, right - problem.b, right + problem.b))
    return rng.choice(sorted(c for c in candidates if c >= 0 and c != right))


def arithmetic_examples(n: int, seed: int = 0, **sizes) -> Iterator[dict]:
    """n SFT records from training problems: the question and its answer. `sizes` (max_operand, max_factor) go to
    arithmetic_problems."""
    for problem in arithmetic_problems(n, seed, **sizes):
        yield {"prompt": problem.question, "completion": str(problem.answer)}


def arithmetic_preferences(n: int, seed: int = 0, **sizes) -> Iterator[dict]:
    """n preference records from training problems: the question, its answer as chosen, a plausible wrong answer as
    rejected. `sizes` (max_operand, max_factor) go to arithmetic_problems."""
    rng = random.Random(f"wrong answers {seed}")  # its own stream, so the problems match arithmetic_problems'
    for problem in arithmetic_problems(n, seed, **sizes):
        yield {"prompt": problem.question, "chosen": str(problem.answer),
               "rejected": str(wrong_answer(problem, rng))}


def qa_text(problem: Problem, answer: int | None = None) -> str:
    """A solved problem in the base-model format: 'Question: What is 7 + 5?\\nAnswer: 12' (the right answer unless
    another is given)."""
    return f"{base_prompt(problem)} {problem.answer if answer is None else answer}"


def base_prompt(problem: Problem) -> str:
    """What a base model is asked: 'Question: What is 7 + 5?\\nAnswer:'."""
    return f"Question: {problem.question}\nAnswer:"


def arithmetic_documents(n: int, seed: int = 0, **sizes) -> Iterator[str]:
    """n pretraining documents, each 4 to 12 solved training problems, one 'Question: ...\\nAnswer: ...' pair after
    another (one newline apart), as the `arithmetic` eval task prompts a base model."""
    rng = _rng("arithmetic documents", seed)
    problems = arithmetic_problems(n * 12, seed, **sizes)
    for _ in range(n):
        yield "\n".join(qa_text(next(problems)) for _ in range(rng.randint(4, 12)))


# ----------------------------------------------------------------------------------------------------- stories

GIRLS = ("Lily", "Mia", "Sara", "Emma", "Zoe", "Anna", "Lucy", "Ella", "Rosa", "Nina", "Ivy", "Maya", "Clara", "Ruby",
         "Hana", "Tess", "Amy", "Kate", "Lena", "Pia", "Jane", "Molly", "Alice", "Grace")
BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn", "Noah", "Omar", "Theo", "Kai", "Eli", "Luca", "Ravi", "Jon",
        "Tim", "Ned", "Oscar", "Hugo", "Dan", "Peter", "Billy", "Joe", "Adam")
PETS = ("Pip", "Bibi", "Coco", "Dot", "Fluff", "Momo", "Bun", "Tiko", "Nutmeg", "Pebble", "Sunny", "Biscuit",
        "Button", "Rusty", "Minnie", "Toby", "Daisy", "Hoppy", "Whiskers", "Patch")
ANIMALS = ("rabbit", "cat", "dog", "bird", "bear", "fox", "mouse", "duck", "frog", "owl", "squirrel", "turtle",
           "lamb", "pig", "hedgehog", "puppy", "kitten", "deer")
GROWNUPS = ("Mom", "Dad", "Grandma", "Grandpa", "the teacher", "Aunt Rose", "Uncle Bill", "the old farmer")
SIZES = ("little", "small", "tiny", "young", "happy", "curious", "shy", "brave", "kind", "playful")
COLOURS = ("red", "blue", "yellow", "green", "purple", "orange", "pink", "white", "brown", "shiny")
THINGS = ("ball", "kite", "hat", "toy boat", "book", "shell", "balloon", "teddy bear", "drum", "scarf", "cup", "box",
          "key", "map", "bell", "crayon", "ribbon", "wagon", "basket", "blanket", "whistle", "marble", "umbrella")
# The little world of the stories (textbook() describes its geography).
PLACES = {  # place: (things seen there, what one does there)
    "the park": (("swings", "a slide", "a big oak tree", "a duck pond"), ("played on the swings", "ran on the grass")),
    "the Tall Forest": (("tall pine trees", "red mushrooms", "a hollow log", "soft green moss"),
                        ("looked for pine cones", "listened to the birds")),
    "Sandy Beach": (("white shells", "small crabs", "big waves", "a sand castle"),
                    ("built a sand castle", "splashed in the water")),
    "Sunny Farm": (("brown cows", "a red barn", "piles of hay", "noisy hens"), ("fed the hens", "jumped in the hay")),
    "the garden": (("bright flowers", "busy bees", "tall sunflowers", "a small pond"),
                   ("picked some flowers", "watered the plants")),
    "the Green River": (("smooth stones", "little fish", "a wooden bridge", "tall reeds"),
                        ("threw stones into the water", "watched the fish swim")),
    "Maple Hill": (("a windy top", "old maple trees", "a view of the whole village", "a long path"),
                   ("flew a kite", "rolled down the grass")),
    "the market": (("fruit stalls", "warm bread", "baskets of apples", "many people"),
                   ("bought some apples", "smelled the fresh bread")),
    "the school": (("a big blackboard", "rows of desks", "a reading corner", "colourful paintings"),
                   ("read a story", "painted a picture")),
    "the meadow": (("yellow daisies", "butterflies", "tall grass", "a little stream"),
                   ("chased butterflies", "made a daisy chain")),
}
FEELINGS = {"happy": ("glad", "cheerful", "full of joy"), "sad": ("unhappy", "gloomy", "a little teary"),
            "scared": ("afraid", "frightened", "nervous"), "excited": ("eager", "thrilled", "bouncy"),
            "proud": ("pleased with {self}", "tall and proud", "very proud"), "tired": ("sleepy", "worn out", "slow"),
            "curious": ("full of questions", "very curious", "eager to know more"),
            "surprised": ("amazed", "astonished", "very surprised")}
OPENINGS = ("Once upon a time, there was {hero_a}.", "One sunny morning, {hero_a} woke up early.",
            "There once lived {hero_a} in the village of Maple Hill.", "Long ago, in a quiet village, lived {hero_a}.",
            "One day, {hero_a} went outside to play.", "On a rainy afternoon, {hero_a} sat by the window.",
            "In a small house near {place}, there lived {hero_a}.", "Every morning, {hero_a} liked to sing.")
TIMES = ("One day", "The next morning", "After lunch", "That afternoon", "Later that day", "One windy day",
         "On Saturday", "In the evening")
LIKES = ("{He} loved {his} {colour} {thing} more than anything.",
         "{He} had {a_colour_thing} that {he} took everywhere.",
         "{His} favourite toy was {a_colour_thing}.", "{He} liked to play with {his} {colour} {thing} all day.")
WEATHER = ("The sun was warm and the sky was blue.", "The wind was soft and the clouds were white.",
           "Birds were singing in the trees.", "It had rained, and the grass was wet and shiny.",
           "The air smelled of flowers.", "It was a cold day, so {he} wore {his} warm coat.")
MORALS = ("sharing makes everyone happy", "it is good to ask for help", "being brave does not mean never being scared",
          "friends help each other", "trying again is how we learn", "kind words make the day brighter",
          "it is fine to make a mistake if you say sorry", "listening to others is important",
          "a small kindness can make a big difference", "patience is a good thing to have")
ENDINGS = ("From that day on, {hero} knew that {moral}.", "{hero} learned that {moral}.",
           "And so {hero} remembered that {moral}.", "That night, {hero} smiled and thought that {moral}.",
           "It was a good day, because {hero} found out that {moral}.")


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _character(rng: random.Random, avoid: str = "", kind: str | None = None, name: str | None = None,
               trait: str | None = None) -> dict:
    """A story's character: a girl, a boy or an animal with a name, a trait (SIZES) and pronouns. `kind` ("girl",
    "boy" or one of ANIMALS), `name` and `trait` fix what a request asked for; the rest is drawn (with none given,
    the draws are the ones stories() has always made)."""
    female = rng.random() < 0.5 if kind not in ("girl", "boy") else kind == "girl"
    if kind is None and name is not None:
        kind = "girl" if name in GIRLS else "boy" if name in BOYS else rng.choice(ANIMALS)
        female = female if kind not in ("girl", "boy") else kind == "girl"
    if kind in ("girl", "boy") or (kind is None and rng.random() < 0.55):
        kind = "girl" if female else "boy"
        name = name or rng.choice([n for n in (GIRLS if female else BOYS) if n != avoid])
    else:
        name, kind = name or rng.choice([n for n in PETS if n != avoid]), kind or rng.choice(ANIMALS)
    size = trait or rng.choice(SIZES)
    called = rng.choice(("named", "called"))
    pronouns = ("she", "her", "her") if female else ("he", "him", "his")
    return {"name": name, "kind": kind, "a": f"{_article(size + ' ' + kind)} {called} {name}",
            "he": pronouns[0], "him": pronouns[1], "his": pronouns[2]}


class _Story:
    """Fills sentence templates with one story's cast and things; keeps the sentences."""

    def __init__(self, rng: random.Random, hero: dict | None = None):
        self.rng = rng
        self.hero = hero or _character(rng)
        self.friend = _character(rng, avoid=self.hero["name"])
        self.place = rng.choice(list(PLACES))
        self.colour, self.thing = rng.choice(COLOURS), rng.choice(THINGS)
        self.grownup = rng.choice(GROWNUPS)
        self.paragraphs: list[list[str]] = [[]]

    def slots(self) -> dict:
        h, f = self.hero, self.friend
        seen, done = PLACES[self.place]
        sights = self.rng.sample(seen, 2)
        return {"hero": h["name"], "hero_a": h["a"], "he": h["he"], "him": h["him"], "his": h["his"],
                "He": h["he"].capitalize(), "His": h["his"].capitalize(), "self": h["him"] + "self",
                "friend": f["name"], "friend_a": f["a"], "fhe": f["he"], "fhis": f["his"], "fhim": f["him"],
                "Fhe": f["he"].capitalize(), "Fhis": f["his"].capitalize(),
                "place": self.place, "Place": self.place[0].upper() + self.place[1:],
                "colour": self.colour, "thing": self.thing, "a_thing": _article(self.thing),
                "a_colour_thing": _article(f"{self.colour} {self.thing}"),
                "seen": sights[0], "seen2": sights[1], "did": self.rng.choice(done),
                "grownup": self.grownup, "Grownup": self.grownup[0].upper() + self.grownup[1:],
                "time": self.rng.choice(TIMES), "feeling": self.feeling(), "moral": self.rng.choice(MORALS)}

    def feeling(self, base: str | None = None) -> str:
        base = base or self.rng.choice(list(FEELINGS))
        word = self.rng.choice((base,) + FEELINGS[base])
        return word.format(self=self.hero["him"] + "self")

    def say(self, *templates: str, **extra: str) -> None:
        sentence = self.rng.choice(templates).format(**{**self.slots(), **extra})
        self.paragraphs[-1].append(sentence[0].upper() + sentence[1:])

    def maybe(self, p: float, *templates: str, **extra: str) -> None:
        if self.rng.random() < p:
            self.say(*templates, **extra)

    def paragraph(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])

    def text(self) -> str:
        return "\n\n".join(" ".join(p) for p in self.paragraphs if p)


def _lost_thing(s: _Story) -> None:
    s.say(*LIKES)
    s.say("{time}, {he} took it to {place}.", "{time}, {hero} and {his} {thing} went to {place}.")
    s.maybe(0.7, *WEATHER)
    s.say("At {place} there were {seen} and {seen2}.", "{He} saw {seen} and {seen2} at {place}.")
    s.say("{He} {did} and forgot all about {his} {thing}.", "{He} put the {thing} down and {did}.")
    s.paragraph()
    s.say("When it was time to go home, the {thing} was gone!", "Later, {hero} looked around. Where was the {thing}?")
    s.say("{hero} felt {sad}. {He} looked under the {x} and behind the {y}, but it was not there.",
          "{hero} was {sad} and started to cry.", sad=s.feeling("sad"), x=s.rng.choice(("bench", "bushes", "rocks")),
          y=s.rng.choice(("tree", "fence", "wall")))
    s.say("Then {friend_a} came by. \"Why are you {sad}?\" {fhe} asked.",
          "Just then, {friend_a} walked up to {him}. \"What is wrong?\" asked {friend}.", sad=s.feeling("sad"))
    s.say("\"I lost my {thing},\" said {hero}.", "{hero} told {friend} about the lost {thing}.")
    s.say("\"I will help you look,\" said {friend}.", "{friend} said, \"Let us look for it together.\"")
    s.paragraph()
    s.say("They looked near {seen} and by {seen2}.", "The two friends searched all over {place}.")
    s.maybe(0.6, "They asked {grownup}, but {grownup} had not seen it.",
            "They called and called, but it did not answer. Of course not, it was {a_thing}!")
    s.say("At last, {friend} shouted, \"I found it!\"", "Finally, {friend} saw something {colour} near {seen}.")
    s.say("{hero} was so {happy}. \"Thank you!\" {he} said and gave {friend} a big hug.",
          "{hero} hugged {his} {thing} and thanked {friend}.", happy=s.feeling("happy"))


def _sharing(s: _Story) -> None:
    s.say(*LIKES)
    s.say("{time}, {hero} went to {place} with {his} {thing}.", "{time}, {he} played with it at {place}.")
    s.maybe(0.6, *WEATHER)
    s.say("There {he} met {friend_a}.", "At {place}, {hero} saw {friend_a} sitting all alone.")
    s.say("{friend} looked at the {thing}. \"Can I play with it too?\" {fhe} asked.",
          "\"What a nice {thing}!\" said {friend}. \"May I have a turn?\"")
    s.paragraph()
    s.say("{hero} did not want to share. \"No, it is mine!\" {he} said.",
          "{hero} held the {thing} tight. \"It is my {thing},\" {he} said.")
    s.say("{friend} felt {sad} and walked away.", "{friend} looked down at the ground and did not say a word.",
          sad=s.feeling("sad"))
    s.say("Soon {hero} felt {bad}. Playing alone was not much fun.", "After a while, the game felt boring to {hero}.",
          bad=s.rng.choice(("bad", "lonely", "sorry")))
    s.paragraph()
    s.say("{He} ran after {friend}. \"I am sorry,\" {he} said. \"Let us play together.\"",
          "{hero} went to {friend} and said, \"You can have a turn. I am sorry.\"")
    s.say("{friend} smiled, and the two of them {did} together.", "Together they {did} and laughed a lot.")
    s.maybe(0.6, "They played until the sun went down.", "{Grownup} watched them and smiled.")
    s.say("{hero} felt {happy}.", "Now both friends were {happy}.", happy=s.feeling("happy"))


def _brave(s: _Story) -> None:
    fear = s.rng.choice(("the dark cave", "the big dog next door", "the noisy goose", "the deep pond",
                         "the tall slide", "the old bridge"))
    s.say("{hero} was afraid of {fear}.", "There was one thing {hero} did not like: {fear}.", fear=fear)
    s.maybe(0.7, "Every time {he} thought about it, {his} tummy felt funny.",
            "{He} always stayed close to {grownup} because of it.")
    s.say("{time}, {hero} and {friend} went to {place}.", "{time}, {grownup} took {hero} to {place}.")
    s.maybe(0.6, *WEATHER)
    s.paragraph()
    s.say("Suddenly {friend} needed help. {Fhe} had dropped {fhis} {thing} near {fear}.",
          "Then {friend} called out. {Fhis} {thing} was stuck right next to {fear}.", fear=fear)
    s.say("{hero} felt {scared}. {His} legs were shaking.", "{hero} was {scared} and wanted to run home.",
          scared=s.feeling("scared"))
    s.say("But {he} took a deep breath and counted to three.", "Then {he} remembered what {grownup} said: \"Be brave, "
          "step by step.\"")
    s.say("Slowly, {he} walked forward and got the {thing}.", "One small step at a time, {he} went and picked up the "
          "{thing}.")
    s.paragraph()
    s.say("\"You did it!\" cheered {friend}.", "{friend} clapped. \"You are so brave!\" {fhe} said.")
    s.say("{hero} felt {proud}.", "{hero} was {proud} and smiled from ear to ear.", proud=s.feeling("proud"))
    s.maybe(0.7, "It was not so scary after all.", "{He} was still a little scared, but that was fine.")


def _adventure(s: _Story) -> None:
    s.say("{hero} wanted to see {place}.", "{hero} had never been to {place}, and {he} was {curious}.",
          curious=s.feeling("curious"))
    s.say("{He} packed {a_colour_thing}, an apple and a bottle of water.", "{He} put on {his} boots and took {his} "
          "{colour} {thing}.")
    s.say("{time}, {he} set off with {friend}.", "{time}, {hero} and {friend_a} started walking.")
    s.maybe(0.7, *WEATHER)
    s.paragraph()
    s.say("The path went past {seen}.", "On the way they saw {seen}.")
    s.say("\"Look!\" said {friend}. \"What is that?\"", "{friend} stopped. \"Do you hear that?\" {fhe} whispered.")
    found = s.rng.choice(("a baby bird in the grass", "a door in an old tree", "a shiny stone", "a lost puppy",
                          "a hidden path", "a nest full of eggs", "a little boat"))
    s.say("It was {found}!", "They found {found}.", found=found)
    s.say("{hero} was {surprised}.", "The two friends were {surprised}.", surprised=s.feeling("surprised"))
    s.maybe(0.6, "They looked at it for a long time.", "They sat down and talked about what to do.")
    s.paragraph()
    s.say("At {place} they {did}.", "When they got to {place}, they {did}.")
    s.say("Then they walked home, {tired} but {happy}.", "When the sun went down, they went home, {tired} and "
          "{happy}.", tired=s.feeling("tired"), happy=s.feeling("happy"))
    s.say("{hero} told {grownup} all about it.", "At dinner, {hero} told everyone about the adventure.")


def _trying(s: _Story) -> None:
    goal = s.rng.choice(("ride a bike", "tie {his} shoes", "climb the big tree", "bake a cake", "whistle a song",
                         "build a tall tower of blocks", "swim across the pond", "jump over the puddle"))
    goal = goal.format(his=s.hero["his"])
    s.say("{hero} wanted to learn to {goal}.", "More than anything, {hero} wanted to {goal}.", goal=goal)
    s.say("{He} tried, but {he} fell down.", "{He} tried once, but it did not work.")
    s.say("{He} tried again, and again it did not work.", "{He} tried a second time and failed again.")
    s.say("{hero} felt {sad}. \"I can not do it,\" {he} said.", "{hero} was {sad} and wanted to give up.",
          sad=s.feeling("sad"))
    s.paragraph()
    s.say("{Grownup} sat down next to {him}. \"Everyone falls at first,\" said {grownup}. \"Go slowly, and do "
          "not stop.\"", "{friend_a} came over. \"Let me show you,\" said {friend}. \"Try one more time, and watch "
          "carefully.\"")
    s.maybe(0.7, *WEATHER)
    s.say("So {hero} tried again, slowly and carefully.", "{hero} took a deep breath and tried once more.")
    s.paragraph()
    s.say("This time it worked! {hero} could {goal}.", "And this time, {hero} did it!", goal=goal)
    s.say("{He} felt {proud}.", "{hero} jumped up and down, {proud}.", proud=s.feeling("proud"))
    s.maybe(0.7, "{friend} laughed and clapped {fhis} hands.", "{Grownup} gave {him} a big hug.")


def _helping(s: _Story) -> None:
    s.say("{hero} lived near {place}.", "{hero} liked to go to {place} every day.")
    s.maybe(0.6, "{He} liked {seen} best of all.", "There {he} often {did}.")
    s.say("{time}, {he} heard a small voice crying.", "{time}, {hero} saw {friend_a} sitting under a tree.")
    trouble = s.rng.choice(("was stuck in a bush", "had hurt {fhis} paw", "could not find the way home",
                            "had lost {fhis} mother", "was too cold to walk", "could not reach the apples"))
    trouble = trouble.format(fhis=s.friend["his"])
    s.say("It was {friend}. {Fhe} {trouble}.", "{friend} {trouble}.", trouble=trouble)
    s.say("\"Please help me,\" said {friend}.", "\"I do not know what to do,\" {friend} said.")
    s.paragraph()
    s.say("{hero} thought for a moment.", "{hero} wanted to help.")
    s.say("{He} used {his} {colour} {thing} to help {fhim}.", "{He} ran to get {grownup}, and together they helped "
          "{friend}.", "{He} gave {friend} {his} {colour} {thing} and stayed with {fhim}.")
    s.say("Soon {friend} was fine again.", "After a while, {friend} felt much better.")
    s.paragraph()
    s.say("\"Thank you,\" said {friend}. \"You are a good friend.\"", "{friend} smiled. \"You are so kind,\" {fhe} "
          "said.")
    s.say("{hero} felt warm inside.", "{hero} felt {happy}.", happy=s.feeling("happy"))
    s.maybe(0.7, "After that, the two of them played together every day.", "Now they were best friends.")


PLOTS = (_lost_thing, _sharing, _brave, _adventure, _trying, _helping)
STORY_WORDS = (80, 250)


def _story(rng: random.Random, hero: dict | None = None, words: tuple[int, int] = STORY_WORDS) -> str:
    """A story, retold until its length is within `words`; `hero` (from _character) fixes its main character."""
    while True:
        s = _Story(rng, hero)
        s.say(*OPENINGS)
        s.maybe(0.5, "{He} had a good friend called {friend}.", "{He} lived with {grownup} in a little house.",
                "{He} liked to sing and dance.")
        s.paragraph()
        rng.choice(PLOTS)(s)
        s.paragraph()
        s.say(*ENDINGS)
        s.maybe(0.2, "The end.")
        text = s.text()
        if words[0] <= len(text.split()) <= words[1]:
            return text


def stories(n: int, seed: int = 0) -> Iterator[str]:
    """n short children's stories (80-250 words each) from six plot shapes and many sentence templates."""
    rng = _rng("stories", seed)
    for _ in range(n):
        yield _story(rng)


# ---------------------------------------------------------------------------------------------------- textbook

TEXTBOOK_WORDS = (100, 300)
EQUATION = r"(\d+) ([-+*]) (\d+) = (\d+)"  # how the textbook writes every sum it states

ANIMAL_FACTS = {  # animal: (home, food, body covering, young, sound)
    "rabbit": ("a burrow under the ground", "grass and carrots", "soft fur", "kit", "thumps its feet"),
    "cat": ("a house with people", "meat and fish", "fur", "kitten", "meows"),
    "dog": ("a house or a kennel", "meat", "fur", "puppy", "barks"),
    "bird": ("a nest", "seeds and worms", "feathers", "chick", "sings"),
    "bear": ("a den", "berries, fish and honey", "thick fur", "cub", "growls"),
    "fox": ("a den", "mice and berries", "red fur", "cub", "yelps"),
    "mouse": ("a small hole", "seeds and grain", "fur", "pup", "squeaks"),
    "duck": ("a pond", "plants and insects", "feathers", "duckling", "quacks"),
    "frog": ("a pond", "insects", "smooth wet skin", "tadpole", "croaks"),
    "owl": ("a hole in a tree", "mice", "feathers", "owlet", "hoots"),
    "sheep": ("a field", "grass", "wool", "lamb", "baas"),
    "cow": ("a field or a barn", "grass and hay", "short hair", "calf", "moos"),
    "pig": ("a sty", "almost anything", "bristly skin", "piglet", "oinks"),
    "hen": ("a coop", "grain and seeds", "feathers", "chick", "clucks"),
    "horse": ("a stable", "grass, hay and oats", "short hair", "foal", "neighs"),
}
MAMMALS = ("rabbit", "cat", "dog", "bear", "fox", "mouse", "sheep", "cow", "pig", "horse")
BIRDS = ("bird", "duck", "owl", "hen")

SCIENCE = {  # topic: (opening, facts in order (each one or more phrasings), exercises (question, answer))
    "Water": ("Water is everywhere around us, and it can change its form.", [
        ("Water can be a solid, a liquid or a gas.", "Water comes in three forms: solid, liquid and gas."),
        ("When water gets very cold, it freezes and becomes ice.", "Ice is water that has frozen."),
        ("Pure water freezes at 0 degrees Celsius.", "At 0 degrees Celsius, water turns into ice."),
        ("When water is heated, it turns into steam.", "Hot water gives off steam, which is water as a gas."),
        ("Pure water boils at 100 degrees Celsius.", "Water boils when it reaches 100 degrees Celsius."),
        ("When ice gets warm, it melts back into water.", "Melting is when a solid, like ice, turns into a liquid."),
    ], [("What is ice?", "Ice is frozen water."), ("At what temperature does water boil?",
                                                  "Water boils at 100 degrees Celsius."),
        ("What happens to ice when it gets warm?", "It melts and becomes water again.")]),
    "The water cycle": ("Rain does not come from nowhere. It is part of the water cycle.", [
        ("The sun warms the water in seas, rivers and lakes.", "Sunshine heats the water in the sea and in rivers."),
        ("Some of the water rises into the air as a gas called water vapour. This is called evaporation.",
         "Warm water slowly turns into water vapour and rises. We call this evaporation."),
        ("High in the sky, the vapour cools and forms tiny drops. The drops make clouds.",
         "When the vapour cools, it turns into small drops of water, and the drops gather into clouds."),
        ("When the drops grow heavy, they fall as rain or snow.", "Heavy drops fall from the clouds as rain, or as "
         "snow when it is cold."),
        ("The rain flows into rivers, and the rivers flow back to the sea.", "Rivers carry the rain back to the "
         "sea, and the cycle starts again."),
    ], [("What is evaporation?", "Evaporation is when water turns into vapour and rises into the air."),
        ("What are clouds made of?", "Clouds are made of tiny drops of water."),
        ("Where does rain go after it falls?", "It flows into rivers, and the rivers flow to the sea.")]),
    "Plants": ("Plants are living things. They grow, and they need food and water like we do.", [
        ("A plant needs sunlight, water and air to grow.", "To grow, plants need light from the sun, water and air."),
        ("The roots hold the plant in the ground and drink up water.", "Roots grow under the ground. They take in "
         "water and keep the plant steady."),
        ("The stem carries water from the roots to the leaves.", "Water travels up the stem to the leaves."),
        ("The green leaves use sunlight to make food for the plant.", "Leaves are green, and they make the plant's "
         "food from sunlight."),
        ("Many plants have flowers, and flowers make seeds.", "Flowers turn into seeds, and seeds grow into new "
         "plants."),
    ], [("What do plants need to grow?", "Plants need sunlight, water and air."),
        ("What do roots do?", "Roots hold the plant in the ground and take in water."),
        ("What do seeds grow into?", "Seeds grow into new plants.")]),
    "Seasons": ("A year has four seasons: spring, summer, autumn and winter.", [
        ("In spring, flowers open and baby animals are born.", "Spring is the season when plants start to grow "
         "again."),
        ("Summer comes after spring. It is the warmest season, and the days are long.", "After spring comes summer, "
         "with long, warm days."),
        ("In autumn, the leaves turn red and yellow and fall from the trees.", "Autumn follows summer. Leaves change "
         "colour and drop to the ground."),
        ("Winter is the coldest season. Sometimes it snows.", "After autumn comes winter, the coldest time of the "
         "year."),
        ("After winter, spring comes again.", "Then the seasons start over with spring."),
    ], [("Which season comes after summer?", "Autumn comes after summer."),
        ("Which is the coldest season?", "Winter is the coldest season."),
        ("How many seasons are there in a year?", "There are four seasons in a year.")]),
    "Day and night": ("Every day the sky gets light, and every night it gets dark. Why?", [
        ("The Earth is a giant ball that spins around.", "Our Earth is round, like a ball, and it turns all the "
         "time."),
        ("It turns around once every day.", "One whole turn of the Earth takes one day."),
        ("When our side of the Earth faces the sun, it is day.", "It is daytime on the side of the Earth that faces "
         "the sun."),
        ("When our side turns away from the sun, it is night.", "Night comes when our side of the Earth faces away "
         "from the sun."),
        ("The sun rises in the east and sets in the west.", "Each morning the sun comes up in the east, and each "
         "evening it goes down in the west."),
    ], [("Why do we have night?", "Because our side of the Earth turns away from the sun."),
        ("Where does the sun rise?", "The sun rises in the east."),
        ("How long does the Earth take to turn around once?", "It takes one day.")]),
}

NEAR_HOME = {  # the science topics in the stories' world
    "Water": ("In winter, the duck pond in the park freezes, and children can see the ice.",
              "When Grandma makes tea, the kettle gives off steam.", "Snow on Maple Hill melts in the spring sun.",
              "Puddles dry up on warm days, because the water turns into vapour."),
    "The water cycle": ("The Green River carries rain from the Tall Forest all the way down past Sunny Farm.",
                        "After a rainy night, the puddles in the village slowly dry in the sun.",
                        "Dark clouds over Maple Hill often mean that rain is coming.",
                        "The sea at Sandy Beach is where much of the water starts its journey."),
    "Plants": ("In the village garden, children water the sunflowers every morning.",
               "The old maple trees on Maple Hill have deep roots.", "At Sunny Farm, the farmer plants wheat seeds "
               "in spring.", "A plant kept in a dark cupboard turns pale and weak."),
    "Seasons": ("In autumn, the maple trees on Maple Hill turn bright red.", "In summer, families go to Sandy Beach "
                "to swim.", "In winter, children slide down Maple Hill on sleds.", "In spring, lambs are born at "
                "Sunny Farm."),
    "Day and night": ("From Maple Hill you can watch the sun rise over the sea at Sandy Beach, in the east.",
                      "At night, the owls of the Tall Forest wake up and hunt.", "In the evening, the sun goes "
                      "down behind the Green River, in the west.", "Most people sleep at night and work in the "
                      "day."),
}

# The little world of the stories: the village of Maple Hill and what lies around it.
GEOGRAPHY = {  # place: (where it is from the village, what it is like)
    "the Tall Forest": ("north", "a forest of tall pine trees where owls, foxes and bears live"),
    "Sunny Farm": ("south", "a farm with cows, hens, a red barn and fields of wheat"),
    "Sandy Beach": ("east", "a beach of white sand beside the sea"),
    "the Green River": ("west", "a river that flows from the Tall Forest down past Sunny Farm"),
    "the meadow": ("north", "a field of grass and daisies between the village and the Tall Forest"),
}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
IN_THE_VILLAGE = {"the market": "in the square at the centre of the village", "the school": "next to the park",
                  "the park": "beside the school, with swings and a duck pond",
                  "the garden": "behind the houses on the west side"}

DEFINITIONS = (  # word, definition, example (with {name})
    ("noun", "A noun is a word for a person, a place or a thing.", "In \"{name} has a ball\", ball is a noun."),
    ("verb", "A verb is a word for an action, like run, jump or sing.", "In \"{name} runs fast\", runs is a verb."),
    ("adjective", "An adjective is a word that tells us more about a noun, like big, red or happy.",
     "In \"{name} has a red hat\", red is an adjective."),
    ("sentence", "A sentence is a group of words that makes sense on its own. It starts with a capital letter and "
     "ends with a full stop, a question mark or an exclamation mark.", "\"{name} likes apples.\" is a sentence."),
    ("river", "A river is a long stream of water that flows across the land.", "{name} threw a stone into the "
     "river."),
    ("forest", "A forest is a large area covered with trees.", "{name} heard an owl in the forest."),
    ("farm", "A farm is a place where people grow food and keep animals.", "{name} fed the hens on the farm."),
    ("market", "A market is a place where people buy and sell things.", "{name} bought apples at the market."),
    ("bridge", "A bridge is something built over a river or a road so that people can cross it.",
     "{name} walked across the bridge."),
    ("nest", "A nest is a home that a bird builds for its eggs.", "{name} saw three eggs in a nest."),
    ("season", "A season is one of the four parts of the year.", "{name}'s favourite season is summer."),
    ("map", "A map is a drawing that shows where places are.", "{name} used a map to find the beach."),
    ("friend", "A friend is someone you like and who likes you.", "{name} played with a friend."),
    ("island", "An island is a piece of land with water all around it.", "{name} dreamed of a little island."),
    ("shadow", "A shadow is a dark shape made when something blocks the light.", "{name} jumped on a shadow."),
    ("harvest", "The harvest is the time when farmers gather their crops.", "{name} helped with the harvest."),
)
NAMES = GIRLS + BOYS


class _Passage:
    def __init__(self, rng: random.Random, title: str):
        self.rng = rng
        self.parts = [title]

    def add(self, *sentences: str) -> None:
        self.parts.append(" ".join(sentences))

    def text(self) -> str:
        return "\n\n".join(self.parts)


def _train_side(rng: random.Random, op: str, low: int, high: int) -> Problem:
    while True:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if op == "-" and b > a:
            a, b = b, a
        if not held_out(a, op, b):
            return make_problem(a, op, b)


def _eq(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b} = {_apply(a, op, b)}"


def _exercises(p: _Passage, rng: random.Random, op: str, low: int, high: int) -> None:
    for i in range(rng.randint(2, 4)):
        q = _train_side(rng, op, low, high)
        label = rng.choice((f"Exercise {i + 1}:", "Exercise:"))
        p.add(f"{label} {q.question}\nSolution: {_eq(q.a, op, q.b)}.")


def _addition(rng: random.Random) -> str:
    p = _Passage(rng, rng.choice(("Lesson: Adding numbers", "Addition", "How to add")))
    p.add(rng.choice(("Adding means putting numbers together to find how many there are in all.",
                      "When we add, we join two groups together and count them all.")),
          rng.choice(("We write addition with the plus sign, +.", "The sign for adding is +, and we say \"plus\".")))
    q = _train_side(rng, "+", 2, 15)
    small = rng.randint(2, 5)
    counted = ", ".join(str(q.a + i) for i in range(1, small + 1))
    p.add(f"Example: What is {q.a} + {small}?", f"Start at {q.a} and count on {small} more: {counted}.",
          f"So {_eq(q.a, '+', small)}.")
    a, b = rng.randint(11, 19), rng.randint(11, 19)
    if rng.random() < 0.5:
        p.add(f"Example: What is {a} + {b}? Add the tens and the ones on their own.",
              f"The tens: {_eq(10, '+', 10)}. The ones: {_eq(a - 10, '+', b - 10)}.",
              f"Together: {_eq(20, '+', a + b - 20)}. So {_eq(a, '+', b)}.")
    else:
        name, things = rng.choice(NAMES), rng.choice(("apples", "shells", "marbles", "stickers", "acorns"))
        p.add(f"Example: {name} has {q.a} {things} and finds {q.b} more. How many {things} does {name} have now?",
              f"We add: {_eq(q.a, '+', q.b)}. {name} has {q.answer} {things}.")
    if rng.random() < 0.5:
        p.add("The order does not matter when we add.", f"{_eq(q.a, '+', q.b)}, and {_eq(q.b, '+', q.a)} too.")
    _exercises(p, rng, "+", 1, MAX_OPERAND)
    return p.text()


def _subtraction(rng: random.Random) -> str:
    p = _Passage(rng, rng.choice(("Lesson: Taking away", "Subtraction", "How to subtract")))
    p.add(rng.choice(("Subtracting means taking some away and finding how many are left.",
                      "When we subtract, we start with a number and take some away.")),
          rng.choice(("We write it with the minus sign, -.", "The sign for taking away is -, and we say \"minus\".")))
    a, b = rng.randint(8, MAX_OPERAND), rng.randint(2, 5)
    counted = ", ".join(str(a - i) for i in range(1, b + 1))
    p.add(f"Example: What is {a} - {b}?", f"Start at {a} and count back {b}: {counted}.", f"So {_eq(a, '-', b)}.")
    p.add(rng.choice(("We can check the answer by adding back:", "To check, add the number we took away:")),
          f"{_eq(a - b, '+', b)}.")
    q = _train_side(rng, "-", 1, MAX_OPERAND)
    name, things = rng.choice(NAMES), rng.choice(("cookies", "balloons", "crayons", "cherries", "pebbles"))
    p.add(f"Example: {name} had {q.a} {things} and gave {q.b} to a friend. How many are left?",
          f"We subtract: {_eq(q.a, '-', q.b)}. {name} has {q.answer} {things} left.")
    if rng.random() < 0.5:
        n = rng.randint(2, MAX_OPERAND)
        p.add("When we take a number away from itself, nothing is left.", f"For example, {_eq(n, '-', n)}.")
    _exercises(p, rng, "-", 1, MAX_OPERAND)
    return p.text()


def _multiplication(rng: random.Random) -> str:
    p = _Passage(rng, rng.choice(("Lesson: Times tables", "Multiplication", "Groups of the same size")))
    p.add(rng.choice(("Multiplying is a quick way to add equal groups.", "When we have several groups of the same "
                      "size, we can multiply to find how many there are in all.")),
          "We write it with the sign *, and we say \"times\".")
    groups, size = rng.randint(2, 4), rng.randint(2, MAX_FACTOR)
    steps, total = [], size
    for _ in range(groups - 1):
        steps.append(_eq(total, "+", size))
        total += size
    p.add(f"Example: {groups} * {size} means {groups} groups of {size}.", f"Adding them up: {', then '.join(steps)}.",
          f"So {_eq(groups, '*', size)}.")
    n = rng.randint(2, MAX_FACTOR)
    facts = [_eq(n, "*", k) for k in range(2, MAX_FACTOR + 1) if not held_out(n, "*", k)]
    p.add(f"Here are some lines from the table of {n}: {'; '.join(facts[:6])}.")
    q = _train_side(rng, "*", 2, MAX_FACTOR)
    name, things = rng.choice(NAMES), rng.choice(("apples", "eggs", "flowers", "fish", "stars"))
    p.add(f"Example: {name} has {q.a} baskets with {q.b} {things} in each. How many {things} are there?",
          f"We multiply: {_eq(q.a, '*', q.b)}. There are {q.answer} {things}.")
    _exercises(p, rng, "*", 2, MAX_FACTOR)
    return p.text()


def _numbers(rng: random.Random) -> str:
    p = _Passage(rng, rng.choice(("Lesson: Bigger and smaller", "Comparing numbers", "Even and odd numbers")))
    p.add("Numbers tell us how many things there are.", "When we count, each number is one more than the one before.")
    a, b = rng.sample(range(1, 50), 2)
    big, small = max(a, b), min(a, b)
    p.add(f"{big} is bigger than {small}, because counting from {small} we reach {big} later.",
          f"We can also say that {small} is smaller than {big}.")
    n = 2 * rng.randint(2, 10)
    p.add("A number is even when it can be split into two equal groups.",
          f"{n} is even, because {n} things make two groups of {n // 2}.",
          f"{n + 1} is odd: split into two groups, one thing is left over.")
    p.add("Even numbers end in 0, 2, 4, 6 or 8. Odd numbers end in 1, 3, 5, 7 or 9.")
    for i in range(rng.randint(2, 4)):
        if rng.random() < 0.5:
            a, b = rng.sample(range(1, 100), 2)
            p.add(f"Exercise {i + 1}: Which is bigger, {a} or {b}?\nSolution: {max(a, b)} is bigger than {min(a, b)}.")
        else:
            k = rng.randint(1, 99)
            p.add(f"Exercise {i + 1}: Is {k} even or odd?\nSolution: {k} is {'even' if k % 2 == 0 else 'odd'}.")
    return p.text()


def _animals(rng: random.Random) -> str:
    p = _Passage(rng, rng.choice(("Lesson: Animals and their homes", "Animals around us", "Meet the animals")))
    p.add(rng.choice(("There are many kinds of animals, and each one lives in its own way.",
                      "Animals need food, water and a safe place to live.")))
    chosen = rng.sample(sorted(ANIMAL_FACTS), rng.randint(3, 5))
    for animal in chosen:
        home, food, covering, young, sound = ANIMAL_FACTS[animal]
        an = _article(animal)
        facts = [rng.choice((f"{an.capitalize()} lives in {home}.", f"The home of {an} is {home}.")),
                 rng.choice((f"It eats {food}.", f"Its food is {food}.")),
                 rng.choice((f"Its body is covered with {covering}.", f"{an.capitalize()} has {covering}.")),
                 rng.choice((f"A baby {animal} is called {_article(young)}.", f"The young of {an} is "
                             f"{_article(young)}.")),
                 f"{an.capitalize()} {sound}."]
        p.add(*[facts[0], *rng.sample(facts[1:], rng.randint(1, 3))])
    kind = rng.choice(("mammal", "bird"))
    if kind == "mammal":
        p.add("Animals with fur or hair that feed their babies milk are called mammals.",
              f"The {rng.choice(MAMMALS)} is a mammal.")
    else:
        p.add("Animals with feathers and wings that lay eggs are called birds.", f"The {rng.choice(BIRDS)} is a bird.")
    animal = rng.choice(chosen)
    p.add(f"Exercise: What is a baby {animal} called?\nSolution: A baby {animal} is called "
          f"{_article(ANIMAL_FACTS[animal][3])}.")
    return p.text()


def _science(rng: random.Random) -> str:
    topic = rng.choice(sorted(SCIENCE))
    opening, facts, exercises = SCIENCE[topic]
    p = _Passage(rng, rng.choice((f"Lesson: {topic}", topic, f"Science: {topic}")))
    p.add(opening)
    kept = [rng.choice(f) for f in facts]
    half = len(kept) // 2
    p.add(*kept[:half])
    p.add(*kept[half:])
    p.add(*rng.sample(NEAR_HOME[topic], 2))
    for question, answer in rng.sample(exercises, rng.randint(2, len(exercises))):
        p.add(f"Exercise: {question}\nSolution: {answer}")
    return p.text()


def _geography(rng: random.Random) -> str:
    p = _Passage(rng, rng.choice(("Our little world", "Geography: Maple Hill and around it", "A map of the village")))
    p.add("The village of Maple Hill is named after the hill at its centre, where old maple trees grow.",
          rng.choice(("Many families live there, in small houses with red roofs.", "It is a quiet village with "
                      "narrow streets and a busy market.")))
    places = rng.sample(sorted(GEOGRAPHY), rng.randint(3, 5))
    for place in places:
        direction, what = GEOGRAPHY[place]
        name = place[0].upper() + place[1:]
        p.add(rng.choice((f"{name} lies to the {direction} of the village.", f"To the {direction} of the village is "
                          f"{place}.")), f"It is {what}.")
    inside = rng.sample(sorted(IN_THE_VILLAGE), 2)
    p.add(*[f"{place[0].upper() + place[1:]} is {IN_THE_VILLAGE[place]}." for place in inside])
    p.add("On a map, north is at the top, south at the bottom, east on the right and west on the left.")
    place = rng.choice(places)
    direction = GEOGRAPHY[place][0]
    if rng.random() < 0.5:
        p.add(f"Exercise: In which direction from the village is {place}?\nSolution: {place[0].upper() + place[1:]} "
              f"is to the {direction} of the village.")
    else:
        p.add(f"Exercise: If you stand in {place} and look at the village, which way are you looking?\n"
              f"Solution: You are looking {OPPOSITE[direction]}, because {place} is to the {direction} of the "
              "village.")
    return p.text()


def _definitions(rng: random.Random) -> str:
    p = _Passage(rng, rng.choice(("Words and what they mean", "A little dictionary", "Lesson: New words")))
    p.add(rng.choice(("Knowing what words mean helps us read and write.", "Here are some words and their meanings.")))
    chosen = rng.sample(DEFINITIONS, rng.randint(4, 6))
    for _, meaning, example in chosen:
        p.add(meaning, "Example: " + example.format(name=rng.choice(NAMES)))
    word, meaning, _ = rng.choice(chosen)
    p.add(f"Exercise: What is {_article(word) if word != 'harvest' else 'the harvest'}?\nSolution: {meaning}")
    return p.text()


TOPICS = (_addition, _subtraction, _multiplication, _numbers, _animals, _science, _geography, _definitions)


def textbook_equations(text: str) -> list[tuple[int, str, int, int]]:
    """Every 'a op b = c' the text states, as (a, op, b, c)."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in re.findall(EQUATION, text)]


def _textbook_passage(rng: random.Random) -> str:
    while True:
        text = rng.choice(TOPICS)(rng)
        words = len(text.split())
        # The worked examples are built right; the check keeps evaluation problems out of every line of them.
        clean = all(not held_out(a, op, b) for a, op, b, _ in textbook_equations(text))
        if clean and TEXTBOOK_WORDS[0] <= words <= TEXTBOOK_WORDS[1]:
            return text


def textbook(n: int, seed: int = 0) -> Iterator[str]:
    """n textbook passages (100-300 words): arithmetic with worked examples and exercises (training problems only),
    numbers, animals, water, weather, plants, seasons, the geography of the stories' world, definitions."""
    rng = _rng("textbook", seed)
    for _ in range(n):
        yield _textbook_passage(rng)


# -------------------------------------------------------------------------------------------------------- chat

CHAT_WORDS = 190  # the longest answer: a story of STORY_WORDS[0]..CHAT_WORDS words
CHAT_KINDS = {"story": 0.3, "definition": 0.15, "fact": 0.4, "small talk": 0.15}  # shares of chat()'s records
STORY_REQUESTS = {  # what is asked for: the phrasings ({who}: "a cat", "a brave cat"; {name}, {kind})
    "any": ("Tell me a story.", "Can you tell me a bedtime story?", "Tell me a short story, please.",
            "Write a story for a child.", "I would like to hear a story.", "Please tell me a story.",
            "Write me a little story.", "Can you make up a story for me?"),
    "who": ("Tell me a story about {who}.", "Write a short story about {who}.", "Can you tell me a story about {who}?",
            "I want a bedtime story about {who}.", "Please write a story about {who}.", "Make up a story about {who}."),
    "named": ("Write a short story about {who} named {name}.", "Tell me a story about {who} called {name}.",
              "Can you write a story about {name}, {who}?", "Tell me a bedtime story about {who} named {name}."),
    "named animal": ("Tell me a story about {name} the {kind}.", "Write a story about {name} the {trait} {kind}."),
}
DEFINITION_QUESTIONS = ("What is {a_word}?", "What does '{word}' mean?", "What does the word \"{word}\" mean?",
                        "What is the meaning of \"{word}\"?", "Can you tell me what {a_word} is?",
                        "Define the word {word}.", "Explain what {a_word} is.", "What is the meaning of the word "
                        "{word}?")
QUESTION_WRAPPERS = ("{q}", "{q}", "{q}", "{q}", "Quick question: {q}", "I wonder: {lq}", "Please tell me: {lq}",
                     "Can you help me? {q}")
SMALL_TALK = (  # (what the user says, what the assistant may answer)
    (("Hello!", "Hi!", "Hi there!", "Hello.", "Hey!", "Good morning!", "Good afternoon!"),
     ("Hello! How can I help you today?", "Hi! What can I do for you today?", "Hello! How can I help?")),
    (("How are you?", "How are you today?", "How is it going?"),
     ("I am fine, thank you! How can I help you today?", "I am doing well, thanks for asking. What can I do for "
      "you?")),
    (("Who are you?", "What is your name?", "What are you?"),
     ("I am a small helpful assistant. I can tell stories, explain words and answer questions about Maple Hill.",
      "I am a little assistant. I like telling stories and answering questions.")),
    (("What can you do?", "How can you help me?", "What do you know?"),
     ("I can tell you a story, explain what a word means, or answer questions about animals, science and the "
      "village of Maple Hill.", "I can tell stories, explain words, and answer questions about animals, water, "
      "plants, the seasons and the village of Maple Hill.")),
    (("Thank you!", "Thanks!", "Thank you very much.", "Thanks a lot!"),
     ("You are welcome!", "You are welcome! I am happy to help.", "Any time!")),
    (("Goodbye!", "Bye!", "See you later!", "Good night!"),
     ("Goodbye! Have a nice day!", "Bye! Come back any time.", "Goodbye, and take care!")),
)
CHAT_SCIENCE = (  # (question phrasings, answer) beyond the textbook's exercises, stating the textbook's facts
    (("At what temperature does water freeze?", "When does water freeze?"),
     "Pure water freezes at 0 degrees Celsius and becomes ice."),
    (("What is steam?",), "Steam is water as a gas. Hot water gives off steam."),
    (("What are the three forms of water?", "What forms can water take?"),
     "Water can be a solid, a liquid or a gas."),
    (("Where does rain come from?", "How is rain made?"),
     "Rain falls from clouds. When the tiny drops of water in a cloud grow heavy, they fall as rain, or as snow "
     "when it is cold."),
    (("What is the water cycle?",),
     "The sun warms the water in seas and rivers, and it rises as vapour. The vapour forms clouds, the clouds "
     "bring rain, and rivers carry the rain back to the sea."),
    (("What do leaves do?", "Why are leaves important?"), "The green leaves use sunlight to make food for the plant."),
    (("What are the four seasons?", "What are the seasons?"),
     "A year has four seasons: spring, summer, autumn and winter."),
    (("What happens in autumn?",), "In autumn, the leaves turn red and yellow and fall from the trees."),
    (("Which is the warmest season?",), "Summer is the warmest season, and the days are long."),
    (("Where does the sun set?",), "The sun sets in the west."),
    (("Why do we have day?", "Why is it light in the day?"), "Because our side of the Earth faces the sun."),
    (("Is the Earth flat?", "What shape is the Earth?"), "The Earth is round, like a giant ball, and it turns "
     "around once every day."),
)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _chat_facts() -> list[tuple[tuple[str, ...], str]]:
    """(question phrasings, answer) pairs stating what the textbook states: the village's geography, animals,
    science."""
    facts = []
    for place, (direction, what) in GEOGRAPHY.items():
        facts.append(((f"Where is {place}?", f"In which direction from the village is {place}?",
                       f"Which way is {place} from Maple Hill?"),
                      f"{_cap(place)} lies to the {direction} of the village of Maple Hill. It is {what}."))
        facts.append(((f"What is {place}?", f"Tell me about {place}.", f"What is {place} like?"),
                      f"{_cap(place)} is {what}. It lies to the {direction} of the village."))
        facts.append(((f"If you stand in {place} and look at the village, which way are you looking?",),
                      f"You are looking {OPPOSITE[direction]}, because {place} is to the {direction} of the "
                      "village."))
    for place, where in IN_THE_VILLAGE.items():
        facts.append(((f"Where is {place}?", f"Where is {place} in Maple Hill?"), f"{_cap(place)} is {where}."))
    facts.append((("Why is the village called Maple Hill?", "How did Maple Hill get its name?"),
                  "The village of Maple Hill is named after the hill at its centre, where old maple trees grow."))
    facts.append((("Where is north on a map?", "How do you read the directions on a map?"),
                  "On a map, north is at the top, south at the bottom, east on the right and west on the left."))
    for animal, (home, food, covering, young, sound) in ANIMAL_FACTS.items():
        an, An = _article(animal), _cap(_article(animal))
        facts.append(((f"Where does {an} live?", f"What is the home of {an}?"), f"{An} lives in {home}."))
        facts.append(((f"What does {an} eat?", f"What food does {an} eat?"), f"{An} eats {food}."))
        facts.append(((f"What is a baby {animal} called?", f"What do we call a baby {animal}?"),
                      f"A baby {animal} is called {_article(young)}."))
        facts.append(((f"What sound does {an} make?",), f"{An} {sound}."))
        facts.append(((f"What is {an} covered with?",), f"The body of {an} is covered with {covering}."))
        facts.append(((f"Tell me about {an}.", f"What do you know about {an}?"),
                      f"{An} lives in {home} and eats {food}. A baby {animal} is called {_article(young)}."))
        if animal in MAMMALS:
            facts.append(((f"Is {an} a mammal?",), f"Yes, the {animal} is a mammal. Mammals have fur or hair and "
                          "feed their babies milk."))
        elif animal in BIRDS:
            facts.append(((f"Is {an} a bird?",), f"Yes, the {animal} is a bird. Birds have feathers and wings and "
                          "lay eggs."))
    for _, _, exercises in SCIENCE.values():
        facts += [((question,), answer) for question, answer in exercises]
    return facts + list(CHAT_SCIENCE)


CHAT_FACTS = _chat_facts()


def _story_chat(rng: random.Random) -> tuple[str, str]:
    """A story request and a story that features whoever was asked for."""
    ask = rng.choice(("any", "who", "who", "named", "named", "named animal"))
    template = rng.choice(STORY_REQUESTS[ask])
    if ask == "any":
        return template, _story(rng, words=(STORY_WORDS[0], CHAT_WORDS))
    person = ask != "named animal" and "{name}, {who}" not in template and rng.random() < 0.25  # not "Lily, a girl"
    kind = rng.choice(("girl", "boy")) if person else rng.choice(ANIMALS)
    trait = rng.choice(SIZES) if "{trait}" in template or (ask != "named animal" and rng.random() < 0.4) else None
    name = None if ask == "who" else rng.choice(GIRLS if kind == "girl" else BOYS if kind == "boy" else PETS)
    request = template.format(who=_article(f"{trait} {kind}" if trait else kind), name=name, kind=kind, trait=trait)
    hero = _character(rng, kind=kind, name=name, trait=trait)
    return request, _story(rng, hero, words=(STORY_WORDS[0], CHAT_WORDS))


def _definition_chat(rng: random.Random) -> tuple[str, str]:
    """'What is a map?' -> the little dictionary's definition and an example, as the textbook gives them."""
    word, meaning, example = rng.choice(DEFINITIONS)
    a_word = "the harvest" if word == "harvest" else _article(word)
    question = rng.choice(DEFINITION_QUESTIONS).format(word=word, a_word=a_word)
    return question, f"{meaning} Example: {example.format(name=rng.choice(NAMES))}"


def _fact_chat(rng: random.Random) -> tuple[str, str]:
    questions, answer = rng.choice(CHAT_FACTS)
    question = rng.choice(questions)
    return rng.choice(QUESTION_WRAPPERS).format(q=question, lq=question[0].lower() + question[1:]), answer


def _small_talk_chat(rng: random.Random) -> tuple[str, str]:
    said, answers = rng.choice(SMALL_TALK)
    return rng.choice(said), rng.choice(answers)


CHAT_MAKERS = {"story": _story_chat, "definition": _definition_chat, "fact": _fact_chat,
               "small talk": _small_talk_chat}


def chat(n: int, seed: int = 0) -> Iterator[dict]:
    """n one-turn conversations {"messages": [user, assistant]} a tiny model can learn in a minute of SFT: story
    requests (answered with a story featuring the animal, name or trait asked for), definitions from the textbook's
    little dictionary, questions on the village's geography, animals and science answered as the textbook states
    them, and greetings and small talk. Answers are at most CHAT_WORDS words."""
    rng = _rng("chat", seed)
    kinds, weights = list(CHAT_KINDS), list(CHAT_KINDS.values())
    for _ in range(n):
        question, answer = CHAT_MAKERS[rng.choices(kinds, weights)[0]](rng)
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# ------------------------------------------------------------------------------------------------ by name


def tinytask_documents(n: int, seed: int = 0) -> Iterator[str]:
    """tinytask's training calls as a base model is prompted for them (system line, tools, request, the cue),
    followed by the call."""
    from fermion.eval import tinytask

    for record in tinytask.sft_records(n, seed):
        system, user, assistant = (m["content"] for m in record["messages"])
        yield f"{system}\n\n{user}{tinytask.BASE_CUE}{assistant}"


def generated_documents(name: str, n: int, seed: int = 0) -> Iterator[str]:
    """n pretraining documents of one generated kind (GENERATED_DOCUMENTS)."""
    makers = {"stories": stories, "textbook": textbook, "arithmetic": arithmetic_documents,
              "tinytask": tinytask_documents}
    if name not in makers:
        raise ValueError(f"unknown generated documents {name!r}; expected one of {', '.join(GENERATED_DOCUMENTS)}")
    return makers[name](n, seed)


def generated_records(name: str, n: int, seed: int = 0) -> Iterator[dict]:
    """n post-training records of one generated kind (GENERATED_RECORDS): SFT prompt/completion or messages, DPO
    prompt/chosen/rejected."""
    if name == "arithmetic":
        return arithmetic_examples(n, seed)
    if name == "arithmetic-pairs":
        return arithmetic_preferences(n, seed)
    if name == "tinytask":
        from fermion.eval import tinytask

        return iter(tinytask.sft_records(n, seed))
    if name == "tinytask-pairs":
        from fermion.eval import tinytask

        return iter(tinytask.preference_records(n, seed))
    if name == "chat":
        return chat(n, seed)
    raise ValueError(f"unknown generated records {name!r}; expected one of {', '.join(GENERATED_RECORDS)}")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write the records one a line (gzip when the name ends in .gz), under a temporary name renamed when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b

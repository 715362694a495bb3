"""Chat conversations a tiny model can learn in a minute of SFT: {"messages": [user, assistant]}.

Story requests answered with a story featuring the animal, name or trait asked for; the little dictionary's
definitions; the village's geography, animals and science as the textbook states them; greetings and small talk.
Answers are at most CHAT_WORDS words.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from fermion.data.synthetic import seeded
from fermion.data.synthetic.stories import ANIMALS, BOYS, GIRLS, PETS, SIZES, STORY_WORDS, article, character, story
from fermion.data.synthetic.textbook import (
    ANIMAL_FACTS,
    BIRDS,
    DEFINITIONS,
    GEOGRAPHY,
    IN_THE_VILLAGE,
    MAMMALS,
    NAMES,
    OPPOSITE,
    SCIENCE,
)

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
        an, An = article(animal), _cap(article(animal))
        facts.append(((f"Where does {an} live?", f"What is the home of {an}?"), f"{An} lives in {home}."))
        facts.append(((f"What does {an} eat?", f"What food does {an} eat?"), f"{An} eats {food}."))
        facts.append(((f"What is a baby {animal} called?", f"What do we call a baby {animal}?"),
                      f"A baby {animal} is called {article(young)}."))
        facts.append(((f"What sound does {an} make?",), f"{An} {sound}."))
        facts.append(((f"What is {an} covered with?",), f"The body of {an} is covered with {covering}."))
        facts.append(((f"Tell me about {an}.", f"What do you know about {an}?"),
                      f"{An} lives in {home} and eats {food}. A baby {animal} is called {article(young)}."))
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
        return template, story(rng, words=(STORY_WORDS[0], CHAT_WORDS))
    person = ask != "named animal" and "{name}, {who}" not in template and rng.random() < 0.25  # not "Lily, a girl"
    kind = rng.choice(("girl", "boy")) if person else rng.choice(ANIMALS)
    trait = rng.choice(SIZES) if "{trait}" in template or (ask != "named animal" and rng.random() < 0.4) else None
    name = None if ask == "who" else rng.choice(GIRLS if kind == "girl" else BOYS if kind == "boy" else PETS)
    request = template.format(who=article(f"{trait} {kind}" if trait else kind), name=name, kind=kind, trait=trait)
    hero = character(rng, kind=kind, name=name, trait=trait)
    return request, story(rng, hero, words=(STORY_WORDS[0], CHAT_WORDS))


def _definition_chat(rng: random.Random) -> tuple[str, str]:
    """'What is a map?' -> the little dictionary's definition and an example, as the textbook gives them."""
    word, meaning, example = rng.choice(DEFINITIONS)
    a_word = "the harvest" if word == "harvest" else article(word)
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
    rng = seeded.rng("chat", seed)
    kinds, weights = list(CHAT_KINDS), list(CHAT_KINDS.values())
    for _ in range(n):
        question, answer = CHAT_MAKERS[rng.choices(kinds, weights)[0]](rng)
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


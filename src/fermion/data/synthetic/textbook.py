"""Textbook passages of 100-300 words: addition, subtraction and times tables with worked examples and exercises
(training problems only: every equation a passage states is checked against the held-out split), numbers, animals,
water, weather, plants, seasons, the geography of the stories' little world, and a little dictionary.

    textbook(n, seed)              n passages
    textbook_equations(text)       every 'a op b = c' a passage states
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from fermion.data.synthetic import seeded
from fermion.data.synthetic.arithmetic import MAX_FACTOR, MAX_OPERAND, Problem, held_out, make_problem, solve
from fermion.data.synthetic.stories import BOYS, GIRLS, article

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
    return f"{a} {op} {b} = {solve(a, op, b)}"


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
        an = article(animal)
        facts = [rng.choice((f"{an.capitalize()} lives in {home}.", f"The home of {an} is {home}.")),
                 rng.choice((f"It eats {food}.", f"Its food is {food}.")),
                 rng.choice((f"Its body is covered with {covering}.", f"{an.capitalize()} has {covering}.")),
                 rng.choice((f"A baby {animal} is called {article(young)}.", f"The young of {an} is "
                             f"{article(young)}.")),
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
          f"{article(ANIMAL_FACTS[animal][3])}.")
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
    p.add(f"Exercise: What is {article(word) if word != 'harvest' else 'the harvest'}?\nSolution: {meaning}")
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
    rng = seeded.rng("textbook", seed)
    for _ in range(n):
        yield _textbook_passage(rng)


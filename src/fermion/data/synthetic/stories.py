"""Children's stories, TinyStories-like: six plot shapes, many sentence templates, names, animals, places, objects,
feelings and morals, in the little world that the textbook describes (the village of Maple Hill).

    stories(n, seed)    n stories of 80-250 words (STORY_WORDS)
    story(rng, hero)    one story, optionally about a given character (chat answers story requests with it)
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from fermion.data.synthetic import seeded

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


def article(word: str) -> str:
    """"a cat", "an owl"."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def character(rng: random.Random, avoid: str = "", kind: str | None = None, name: str | None = None,
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
    return {"name": name, "kind": kind, "a": f"{article(size + ' ' + kind)} {called} {name}",
            "he": pronouns[0], "him": pronouns[1], "his": pronouns[2]}


class _Story:
    """Fills sentence templates with one story's cast and things; keeps the sentences."""

    def __init__(self, rng: random.Random, hero: dict | None = None):
        self.rng = rng
        self.hero = hero or character(rng)
        self.friend = character(rng, avoid=self.hero["name"])
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
                "colour": self.colour, "thing": self.thing, "a_thing": article(self.thing),
                "a_colour_thing": article(f"{self.colour} {self.thing}"),
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


def story(rng: random.Random, hero: dict | None = None, words: tuple[int, int] = STORY_WORDS) -> str:
    """A story, retold until its length is within `words`; `hero` (from character) fixes its main character."""
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
    rng = seeded.rng("stories", seed)
    for _ in range(n):
        yield story(rng)


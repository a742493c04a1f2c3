"""Stories and questions in the style of bAbI (qa1..qa5) and of the RMT paper's three memory tasks.

bAbI itself is not redistributable here, so this is a small world simulation of our own: actors move between six
places, pick up, drop and give objects, and rooms lie north/south/east/west of each other. Every sentence is an
event applied to the `World`, and every answer is read off the world's state, never off a template; the world also
records which sentences established each piece of state, so every question knows its supporting facts.

All randomness comes from the `random.Random` passed in, so a seed fixes a story.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
ACTORS = ("Mary", "John", "Daniel", "Sandra")
QA5_ACTORS = ("Mary", "Fred", "Bill", "Jeff")
OBJECTS = ("football", "apple", "milk")
MOVE_VERBS = ("moved to", "went to", "went back to", "journeyed to", "travelled to")
TAKE_VERBS = ("got", "grabbed", "picked up", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}

# The answer vocabulary of each story kind: an encoder classifies over it, the BABILong metric scores with it.
ANSWERS: dict[str, tuple[str, ...]] = {
    "qa1": PLACES,
    "qa2": PLACES,
    "qa3": PLACES,
    "qa4": PLACES,
    "qa5": tuple(QA5_ACTORS) + OBJECTS,
    "memorize": PLACES,
    "detect": PLACES,
    "reason": PLACES,
}

# Default story sizes (number of fact sentences), inclusive ranges.
DEFAULT_NUM_FACTS = {"qa1": (2, 10), "qa2": (6, 16), "qa3": (8, 20), "qa4": (2, 2), "qa5": (6, 16)}


@dataclass(frozen=True)
class Story:
    """A list of fact sentences and one question about them.

    `supporting` holds the indices (into `facts`) of the sentences the answer depends on; `label` is the index of
    `answer` in `ANSWERS[task]`.
    """

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]
    label: int


@dataclass
class World:
    """The state that a story's sentences build: who is where, who holds what, where things have been."""

    facts: list[str] = field(default_factory=list)
    place: dict[str, str] = field(default_factory=dict)  # actor -> place
    place_fact: dict[str, int] = field(default_factory=dict)  # actor -> the sentence that put them there
    holder: dict[str, str] = field(default_factory=dict)  # object -> actor carrying it
    take_fact: dict[str, int] = field(default_factory=dict)  # object -> the sentence where its holder took it
    lying: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # object -> (place, support)
    # object -> its places in order, each with the sentences that prove it moved there from the previous one.
    history: dict[str, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)
    gives: list[tuple[str, str, str, int]] = field(default_factory=list)  # (giver, object, receiver, sentence)

    def _say(self, sentence: str) -> int:
        self.facts.append(sentence)
        return len(self.facts) - 1

    def move(self, actor: str, place: str, verb: str) -> None:
        """The actor goes somewhere else, carrying whatever they hold."""
        if self.place.get(actor) == place:
            raise ValueError(f"place: {actor} is already in the {place}")
        before = self.place_fact.get(actor)
        index = self._say(f"{actor} {verb} the {place}.")
        self.place[actor], self.place_fact[actor] = place, index
        for obj, who in self.holder.items():
            if who != actor:
                continue
            # the holder's previous place, that they held it, and where they went: the object moved with them
            proof = tuple(sorted({i for i in (before, self.take_fact[obj], index) if i is not None}))
            self.history.setdefault(obj, []).append((place, proof))

    def can_take(self, actor: str, obj: str) -> bool:
        """An object can be taken if nobody holds it and it lies where the actor is (or was never seen)."""
        if obj in self.holder:
            return False
        if obj in self.lying:
            return self.place.get(actor) == self.lying[obj][0]
        return True

    def take(self, actor: str, obj: str, verb: str) -> None:
        """The actor picks up an object; it now goes where they go."""
        if not self.can_take(actor, obj):
            raise ValueError(f"obj: {actor} cannot take the {obj} here")
        index = self._say(f"{actor} {verb} the {obj}.")
        self.holder[obj], self.take_fact[obj] = actor, index
        self.lying.pop(obj, None)
        if actor in self.place:
            steps = self.history.setdefault(obj, [])
            if not steps or steps[-1][0] != self.place[actor]:
                steps.append((self.place[actor], (self.place_fact[actor], index)))

    def drop(self, actor: str, obj: str, verb: str) -> None:
        """The actor puts an object down where they stand."""
        if self.holder.get(obj) != actor or actor not in self.place:
            raise ValueError(f"obj: {actor} does not hold the {obj} in a known place")
        index = self._say(f"{actor} {verb} the {obj}.")
        del self.holder[obj]
        self.lying[obj] = (self.place[actor], (self.place_fact[actor], index))

    def give(self, giver: str, obj: str, receiver: str) -> None:
        """One actor hands an object to another in the same place."""
        if self.holder.get(obj) != giver or giver == receiver or self.place.get(receiver) != self.place.get(giver):
            raise ValueError(f"obj: {giver} cannot give the {obj} to {receiver}")
        index = self._say(f"{giver} gave the {obj} to {receiver}.")
        self.holder[obj], self.take_fact[obj] = receiver, index
        self.gives.append((giver, obj, receiver, index))

    def where_is(self, obj: str) -> tuple[str, tuple[int, ...]] | None:
        """An object's place and the sentences that prove it, or None if the story does not tell."""
        if obj in self.lying:
            return self.lying[obj]
        actor = self.holder.get(obj)
        if actor is None or actor not in self.place:
            return None
        return self.place[actor], tuple(sorted({self.place_fact[actor], self.take_fact[obj]}))


def _story(task: str, world: World, question: str, answer: str, supporting: tuple[int, ...]) -> Story:
    return Story(
        task=task,
        facts=tuple(world.facts),
        question=question,
        answer=answer,
        supporting=tuple(sorted(supporting)),
        label=ANSWERS[task].index(answer),
    )


def _random_move(rng: random.Random, world: World, actor: str) -> None:
    choices = [p for p in PLACES if p != world.place.get(actor)]
    world.move(actor, rng.choice(choices), rng.choice(MOVE_VERBS))


MIN_FACTS = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 1, "qa5": 4}  # the fewest sentences a question can need


def fact_range(task: str, num_facts: int | Sequence[int] | None) -> tuple[int, int]:
    """The (low, high) number of sentences `num_facts` (an int, a (low, high) pair, None: the task's own) asks of
    `task`'s stories; a ValueError naming num_facts for a task with a fixed story or a range it cannot draw."""
    if task not in DEFAULT_NUM_FACTS:
        raise ValueError(f"num_facts is for tasks {sorted(DEFAULT_NUM_FACTS)}; {task!r} has a fixed story")
    if num_facts is None:
        return DEFAULT_NUM_FACTS[task]
    bounds = [num_facts] * 2 if isinstance(num_facts, int) else num_facts
    ints = isinstance(bounds, list | tuple) and len(bounds) == 2
    ints = ints and all(isinstance(v, int) and not isinstance(v, bool) for v in bounds)
    if not ints or bounds[0] < MIN_FACTS[task] or bounds[1] < bounds[0]:
        raise ValueError(
            f"num_facts must be an int >= {MIN_FACTS[task]} for {task}, or an increasing (low, high) pair of such "
            f"ints, got {num_facts!r}"
        )
    return bounds[0], bounds[1]


def _num_facts(rng: random.Random, task: str, num_facts: int | Sequence[int] | None) -> int:
    return rng.randint(*fact_range(task, num_facts))


def _simulate(rng: random.Random, world: World, actors: tuple[str, ...], steps: int, gives: bool) -> None:
    """Random events: mostly moves, with takes, drops (and gives) whenever the world allows them."""
    while len(world.facts) < steps:
        actor = rng.choice(actors)
        held = [o for o, who in world.holder.items() if who == actor]
        takeable = [o for o in OBJECTS if actor in world.place and world.can_take(actor, o)]
        others = [a for a in actors if a != actor and a in world.place and world.place[a] == world.place.get(actor)]
        roll = rng.random()
        if gives and held and others and roll < 0.5:
            world.give(actor, rng.choice(held), rng.choice(others))
        elif takeable and roll < 0.35:
            world.take(actor, rng.choice(takeable), rng.choice(TAKE_VERBS))
        elif held and roll < 0.5:
            world.drop(actor, rng.choice(held), rng.choice(DROP_VERBS))
        elif gives and held and rng.random() < 0.5 and any(a != actor and a in world.place for a in actors):
            # walk towards someone to hand them something
            target = rng.choice([a for a in actors if a != actor and a in world.place])
            if world.place[target] != world.place.get(actor):
                world.move(actor, world.place[target], rng.choice(MOVE_VERBS))
            else:
                _random_move(rng, world, actor)
        else:
            _random_move(rng, world, actor)


def qa1(rng: random.Random, num_facts: int | tuple[int, int] | None = None, distinct_actors: bool = False) -> Story:
    """Single supporting fact: actors move around; "Where is Mary?" is answered by her last move.

    `distinct_actors`: every sentence moves another actor to another place (at most len(ACTORS) sentences), so
    the answering sentence is any of the story's alike: answering the story's last place scores 1/n, and only an
    actor bound to their place answers."""
    world = World()
    count = _num_facts(rng, "qa1", num_facts)
    if not distinct_actors:
        for _ in range(count):
            _random_move(rng, world, rng.choice(ACTORS))
    elif count > len(ACTORS):
        raise ValueError(f"distinct_actors: a story of {count} facts needs {count} actors; qa1 has {len(ACTORS)}")
    else:
        for actor, place in zip(rng.sample(ACTORS, count), rng.sample(PLACES, count), strict=True):
            world.move(actor, place, rng.choice(MOVE_VERBS))
    actor = rng.choice(sorted(world.place))
    return _story("qa1", world, f"Where is {actor}?", world.place[actor], (world.place_fact[actor],))


def qa2(rng: random.Random, num_facts: int | tuple[int, int] | None = None) -> Story:
    """Two supporting facts: "Where is the football?" needs who took it (or dropped it) and where they were."""
    steps = _num_facts(rng, "qa2", num_facts)
    while True:
        world = World()
        _simulate(rng, world, ACTORS, steps, gives=False)
        known = [o for o in OBJECTS if world.where_is(o) is not None]
        if known:
            obj = rng.choice(known)
            place, proof = world.where_is(obj)
            return _story("qa2", world, f"Where is the {obj}?", place, proof)


def qa3(rng: random.Random, num_facts: int | tuple[int, int] | None = None) -> Story:
    """Three supporting facts: "Where was the football before the kitchen?" needs the object's path."""
    steps = _num_facts(rng, "qa3", num_facts)
    while True:
        world = World()
        _simulate(rng, world, ACTORS, steps, gives=False)
        candidates = []
        for obj, path in world.history.items():
            places = [p for p, _ in path]
            for i in range(1, len(path)):
                if places.count(places[i]) == 1:
                    candidates.append((obj, i))
        if candidates:
            obj, i = rng.choice(candidates)
            path = world.history[obj]
            question = f"Where was the {obj} before the {path[i][0]}?"
            return _story("qa3", world, question, path[i - 1][0], path[i][1])


def qa4(rng: random.Random, num_facts: int | tuple[int, int] | None = None) -> Story:
    """Two-argument relations: rooms on a grid; "What is north of the bedroom?" is read off the map."""
    steps = min(_num_facts(rng, "qa4", num_facts), len(PLACES) - 1)
    while True:
        places = rng.sample(PLACES, steps + 1)
        grid = {places[0]: (0, 0)}
        cells = {(0, 0): places[0]}
        edges: list[tuple[str, str]] = []  # (a, b): a and b are neighbours on the grid
        for place in places[1:]:
            anchor = rng.choice(list(grid))
            free = [
                (d, (grid[anchor][0] + dx, grid[anchor][1] + dy))
                for d, (dx, dy) in DIRECTIONS.items()
                if (grid[anchor][0] + dx, grid[anchor][1] + dy) not in cells
            ]
            if not free:
                break
            _, cell = rng.choice(free)
            grid[place], cells[cell] = cell, place
            edges.append((place, anchor))
        if len(edges) == steps:
            break
    world = World()

    def direction(a: str, b: str) -> str:  # the direction in which a lies from b
        delta = (grid[a][0] - grid[b][0], grid[a][1] - grid[b][1])
        return next(d for d, step in DIRECTIONS.items() if step == delta)

    for a, b in edges:
        if rng.random() < 0.5:
            a, b = b, a
        world._say(f"The {a} is {direction(a, b)} of the {b}.")
    index = rng.randrange(len(edges))
    a, b = edges[index]
    if rng.random() < 0.5:
        a, b = b, a
    if rng.random() < 0.5:  # what lies in direction d of b? -> a
        return _story("qa4", world, f"What is {direction(a, b)} of the {b}?", a, (index,))
    return _story("qa4", world, f"What is the {a} {direction(a, b)} of?", b, (index,))


def qa5(rng: random.Random, num_facts: int | tuple[int, int] | None = None) -> Story:
    """Three-argument relations: "Fred gave the apple to Bill."; who gave, what, who received (the latest)."""
    steps = _num_facts(rng, "qa5", num_facts)
    while True:
        world = World()
        _simulate(rng, world, QA5_ACTORS, steps, gives=True)
        if world.gives:
            break
    giver, obj, receiver, _ = rng.choice(world.gives)
    kind = rng.randrange(5)
    questions: list[tuple[str, Callable[[tuple[str, str, str, int]], bool], int]] = [
        (f"Who gave the {obj} to {receiver}?", lambda g: g[1] == obj and g[2] == receiver, 0),
        (f"Who gave the {obj}?", lambda g: g[1] == obj, 0),
        (f"Who received the {obj}?", lambda g: g[1] == obj, 2),
        (f"What did {giver} give to {receiver}?", lambda g: g[0] == giver and g[2] == receiver, 1),
        (f"Who did {giver} give the {obj} to?", lambda g: g[0] == giver and g[1] == obj, 2),
    ]
    question, matches, slot = questions[kind]
    latest = [g for g in world.gives if matches(g)][-1]  # the most recent event the question is about
    return _story("qa5", world, question, latest[slot], (latest[3],))


def memorize(rng: random.Random) -> Story:
    """Fact memorization (RMT, 2304.11062): one move; "Where is Mary?" (the haystack puts it first)."""
    world = World()
    actor = rng.choice(ACTORS)
    _random_move(rng, world, actor)
    return _story("memorize", world, f"Where is {actor}?", world.place[actor], (0,))


def detect(rng: random.Random) -> Story:
    """Fact detection and memorization: the same one-move story (the haystack hides it anywhere)."""
    story = memorize(rng)
    return Story("detect", story.facts, story.question, story.answer, story.supporting, story.label)


def reason(rng: random.Random) -> Story:
    """Reasoning with memorized facts: one actor moves and takes an object (either order), another actor moves
    elsewhere; "Where is the apple?" needs both of the first actor's facts."""
    world = World()
    first, other = rng.sample(ACTORS, 2)
    obj = rng.choice(OBJECTS)
    first_place, other_place = rng.sample(PLACES, 2)
    events = [
        lambda: world.move(first, first_place, rng.choice(MOVE_VERBS)),
        lambda: world.take(first, obj, rng.choice(TAKE_VERBS)),
    ]
    if rng.random() < 0.5:
        events.reverse()
    events.insert(rng.randrange(3), lambda: world.move(other, other_place, rng.choice(MOVE_VERBS)))
    for event in events:
        event()
    place, proof = world.where_is(obj)
    return _story("reason", world, f"Where is the {obj}?", place, proof)


STORY_GENERATORS: dict[str, Callable[[random.Random], Story]] = {
    "qa1": qa1,
    "qa2": qa2,
    "qa3": qa3,
    "qa4": qa4,
    "qa5": qa5,
    "memorize": memorize,
    "detect": detect,
    "reason": reason,
}


def generate_story(
    task: str, rng: random.Random, num_facts: int | Sequence[int] | None = None, distinct_actors: bool = False
) -> Story:
    """One story of a bAbI-style task; all randomness comes from `rng`. `num_facts` (qa1-qa5: an int or a (low,
    high) range) sets how many sentences the story has; None: the task's own range (`DEFAULT_NUM_FACTS`).
    `distinct_actors` (qa1): each sentence about another actor (see `qa1`)."""
    if task not in STORY_GENERATORS:
        raise ValueError(f"task must be one of {sorted(STORY_GENERATORS)}, got {task!r}")
    if distinct_actors:
        if task != "qa1":
            raise ValueError(f"distinct_actors is for qa1, where each sentence moves one actor; got task {task!r}")
        return qa1(rng, num_facts, distinct_actors=True)
    if num_facts is None:
        return STORY_GENERATORS[task](rng)
    fact_range(task, num_facts)  # a task with a fixed story takes none
    return STORY_GENERATORS[task](rng, num_facts)

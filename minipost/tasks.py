"""The built-in tasks: deterministic text generators, splits and reward functions (no downloads).

Every task gives four kinds of data, all a pure function of (split, n, seed) through random.Random:
    corpus(n_docs, seed)       raw pretraining documents: plain text, no chat format
    demos(split, n, seed)      SFT rows {"messages": [user, assistant], **extra}
    prompts(split, n, seed)    RL / eval rows {"prompt": [user], **extra}; row i is the problem of demos row i
    reward(prompts, completions, **columns) -> list[float]     TRL-style; extra columns arrive as lists

arith      short word problems with a worked answer ("12 + 7 = 19. 19 - 5 = 14. The answer is 14.").
           Rows carry "answer" (str); prompt rows also "steps" (int, the number of arithmetic steps).
           Verifier reward 1/0. Splits train / test (same distribution, disjoint problem texts) and ood
           (three steps instead of one or two).
sentiment  the DPO paper's IMDb experiment in miniature: synthetic movie reviews, prompts are review openings,
           the hidden reward is a lexicon positivity score of the completion in [-1, 1].

The train/test split is decided by a hash of the problem text (arith) or of the review opening (sentiment),
not by the seed: a test item can never appear in train, whatever seeds and sizes the two calls use.
"""
import math
import random
import re
import zlib

TASKS = ("arith", "sentiment")


def _is_test_text(text: str) -> bool:
    """Deterministic 80/20 train/test assignment of a text, independent of any seed."""
    return zlib.crc32(text.encode()) % 5 == 0


def _completion_text(completion) -> str:
    """A completion as text: a string, or (conversational format) a list of messages whose last one counts."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


class Task:
    """Base class; see the module docstring for what each method returns."""
    name: str = ""
    splits: tuple[str, ...] = ()
    eval_temperature: float = 0.0  # how evaluation samples: greedy for a verifier, the policy itself for rewards

    def corpus(self, n_docs: int, seed: int = 0) -> list[str]:
        raise NotImplementedError

    def demos(self, split: str, n: int, seed: int = 0) -> list[dict]:
        raise NotImplementedError

    def prompts(self, split: str, n: int, seed: int = 0) -> list[dict]:
        raise NotImplementedError

    def reward(self, prompts: list, completions: list, **kwargs) -> list[float]:
        raise NotImplementedError

    def format_ok(self, completions: list) -> list[bool]:
        raise NotImplementedError

    def _rng(self, what: str, seed: int) -> random.Random:
        # seeding from a string is stable across runs and Python versions (sha512 of the string)
        return random.Random(f"{self.name}/{what}/{seed}")

    def _check_split(self, split: str):
        if split not in self.splits:
            raise ValueError(f"task '{self.name}' has no split '{split}' (choose from {', '.join(self.splits)})")


# ----------------------------------------------------------------------------------------------------------
# arith

NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Ben", "he"),
         ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Noah", "he"), ("Ella", "she"), ("Omar", "he"),
         ("Nina", "she"), ("Ravi", "he"), ("Sara", "she"), ("Tom", "he")]
OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "cookies", "pencils", "stamps", "cards",
           "shells", "balloons", "crayons"]
BAKED = ["cakes", "pies", "muffins", "rolls", "buns"]

# A scene: how a quantity is introduced, changed and asked about. Every "add" clause contains the word
# "more" and no "sub" clause does (the tests rely on it to solve problems independently). {S}: subject
# pronoun, dropped when two clauses with the same subject are joined by "and".
# "state" says the running total in the corpus stories.
SCENES = [
    dict(intro="{name} has {n} {obj}.", intro_mul="{name} has {a} boxes with {b} {obj} in each box.",
         intro_mul2="{name} has {a} bags of {b} {obj}.",
         add=["{S} buys {k} more", "{S} finds {k} more", "{S} gets {k} more from a friend", "{S} wins {k} more"],
         sub=["{S} gives {k} away", "{S} loses {k}", "{S} gives {k} to a friend", "{S} sells {k}"],
         question="How many {obj} does {name} have now?", state="{S} has {c} {obj}", objs=OBJECTS),
    dict(intro="A bakery has {n} {obj}.", intro_mul="A bakery has {a} trays with {b} {obj} on each tray.",
         intro_mul2="A bakery has {a} boxes of {b} {obj}.",
         add=["{S} bakes {k} more", "{S} makes {k} more"],
         sub=["{S} sells {k}", "{S} gives {k} to a school"],
         question="How many {obj} does the bakery have now?", state="{S} has {c} {obj}", objs=BAKED,
         pronoun="it"),
    dict(intro="A bus has {n} people on it.", intro_mul="A bus has {a} rows with {b} people in each row.",
         intro_mul2="A bus has {a} groups of {b} people on it.",
         add=["{k} more people get on", "at the next stop {k} more people get on"],
         sub=["{k} people get off", "at the next stop {k} people get off"],
         question="How many people are on the bus now?", state="there are {c} people on the bus"),
    dict(intro="There are {n} birds in a tree.", intro_mul="There are {a} trees with {b} birds in each tree.",
         intro_mul2="There are {a} flocks of {b} birds in a field.",
         add=["{k} more birds land", "{k} more birds join them"],
         sub=["{k} birds fly away", "a cat scares {k} birds away"],
         question="How many birds are there now?", state="there are {c} birds"),
]

MAX_VALUE = 20  # small enough for a ~1M-parameter model to learn the facts; every number in a problem and in its worked answer lies in [2, MAX_VALUE]
OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def _sample_problem(rng: random.Random, n_steps: int) -> dict:
    """One word problem with exactly n_steps arithmetic steps.

    Returns dict(scene, name, pron, obj, start, steps): the quantity starts at `start` (a plain number, or
    a * b for a multiplication intro, which is the first step); each step is (op, a, b, result), and each
    later step's a is the previous result. All numbers stay in [2, MAX_VALUE] (so never "1 apples").
    """
    scene = rng.choice(SCENES)
    name, pron = rng.choice(NAMES)
    obj = rng.choice(scene.get("objs", [""]))
    steps = []
    # multiplication intro: "3 boxes with 6 apples in each box" is step one. Not alone: the bare product
    # problems are so few that they would repeat all over a split.
    if n_steps > 1 and rng.random() < 0.3:
        a = rng.randint(2, 5)
        b = rng.randint(2, MAX_VALUE // a)
        steps.append(("mul", a, b, a * b))
        cur = a * b
    else:
        cur = rng.randint(5, MAX_VALUE)
    start = cur
    while len(steps) < n_steps:
        ops = (["add"] if cur + 2 <= MAX_VALUE else []) + (["sub"] if cur >= 4 else [])
        op = rng.choice(ops)
        k = rng.randint(2, min(30, MAX_VALUE - cur)) if op == "add" else rng.randint(2, cur - 2)
        steps.append((op, cur, k, _apply(op, cur, k)))
        cur = steps[-1][3]
    return dict(scene=scene, name=name, pron=scene.get("pronoun", pron), obj=obj, start=start, steps=steps)


def _clauses(p: dict, rng: random.Random) -> list[tuple[str, str]]:
    """The add/sub steps as (subject, rest) clauses; subject "" when the template has none."""
    out = []
    for op, _, k, _ in p["steps"]:
        if op == "mul":
            continue
        t = rng.choice(p["scene"][op]).format(S="{S}", k=k)
        out.append(("{S}", t[4:]) if t.startswith("{S} ") else ("", t))
    return out


def _join(clauses: list[tuple[str, str]], pron: str, rng: random.Random, tails: list[str] | None = None) -> str:
    """Clauses -> sentences. Consecutive clauses are joined by "and" (subject dropped when shared) or start
    a new sentence with "Then". `tails` (corpus stories) appends ", so <state>" to each clause."""
    sentences, cur, joined = [], "", False
    for i, (subj, rest) in enumerate(clauses):
        text = (pron + " " + rest) if subj else rest
        if tails:
            text += ", so " + tails[i]
        if cur and not tails and not joined and rng.random() < 0.5:  # at most one "and" per sentence
            cur += " and " + (rest if subj and clauses[i - 1][0] else text)
            joined = True
        else:
            joined = False
            if cur:
                sentences.append(cur + ".")
                text = "then " + text
            cur = text
    if cur:
        sentences.append(cur + ".")
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def _intro(p: dict, rng: random.Random) -> str:
    s, first = p["scene"], p["steps"][0]
    if first[0] == "mul":
        t = s["intro_mul"] if rng.random() < 0.5 else s["intro_mul2"]
        return t.format(name=p["name"], obj=p["obj"], a=first[1], b=first[2])
    return s["intro"].format(name=p["name"], obj=p["obj"], n=p["start"])


def _question_text(p: dict, rng: random.Random) -> str:
    parts = [_intro(p, rng), _join(_clauses(p, rng), p["pron"], rng),
             p["scene"]["question"].format(name=p["name"], obj=p["obj"])]
    return " ".join(x for x in parts if x)


def _worked_answer(p: dict) -> str:
    lines = [f"{a} {OP_SYMBOL[op]} {b} = {c}." for op, a, b, c in p["steps"]]
    return " ".join(lines) + f" The answer is {p['steps'][-1][3]}."


def _story(p: dict, rng: random.Random) -> str:
    """Corpus form of a problem: a narrative that states each running total, with no question or answer."""
    clauses = _clauses(p, rng)
    state = p["scene"]["state"]
    tails = ["now " + state.format(S=p["pron"], c=c, obj=p["obj"]) for op, _, _, c in p["steps"] if op != "mul"]
    intro = _intro(p, rng)
    if p["steps"][0][0] == "mul":
        state = p["scene"]["state"].format(S=p["pron"], c=p["start"], obj=p["obj"])
        intro += " So " + state + "."
    return (intro + " " + _join(clauses, p["pron"], rng, tails)).strip()


def _fact(rng: random.Random) -> str:
    """One arithmetic fact in words or symbols, numbers in the problems' range."""
    kind = rng.randrange(6)
    if kind == 5:
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        return rng.choice([f"{a} times {b} is {a * b}.", f"{a} * {b} = {a * b}.", f"{a} groups of {b} make {a * b}."])
    a, b = rng.randint(0, MAX_VALUE), rng.randint(0, MAX_VALUE)
    if kind < 3:
        return rng.choice([f"{a} plus {b} is {a + b}.", f"{a} + {b} = {a + b}.", f"The sum of {a} and {b} is {a + b}.",
                           f"Adding {b} to {a} gives {a + b}."])
    a, b = max(a, b), min(a, b)
    return rng.choice([f"{a} minus {b} is {a - b}.", f"{a} - {b} = {a - b}.", f"Taking {b} from {a} leaves {a - b}.",
                       f"The difference between {a} and {b} is {a - b}."])


def _chain(rng: random.Random) -> str:
    """A bare worked computation of 1-3 steps: "12 + 7 = 19, and 19 - 5 = 14." """
    p = _sample_problem(rng, rng.randint(1, 3))
    eqs = [f"{a} {OP_SYMBOL[op]} {b} = {c}" for op, a, b, c in p["steps"]]
    sep = rng.choice([". ", ", and ", ", then "])
    return sep.join(eqs) + "."


_ANSWER_RE = re.compile(r"the answer is\s*(-?\d+)", re.IGNORECASE)
_INT_RE = re.compile(r"-?\d+")
_ARITH_FORMAT_RE = re.compile(r"(\d+ [-+*] \d+ = \d+\. )+The answer is \d+\.")


def extract_answer(text: str) -> int | None:
    """The final number of a completion: the last "The answer is N" if present, else the last integer."""
    m = _ANSWER_RE.findall(text)
    if m:
        return int(m[-1])
    m = _INT_RE.findall(text)
    return int(m[-1]) if m else None


def arith_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """Verifier: 1.0 if the completion's final number (see extract_answer) equals the answer column, else 0.0.

    A completion with no integer at all scores 0.0. `answer` is the list of reference answers (str or int).
    """
    if answer is None:
        raise ValueError("arith_reward needs the 'answer' column (prompt rows carry it)")
    if len(answer) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    out = []
    for c, a in zip(completions, answer):
        got = extract_answer(_completion_text(c))
        out.append(1.0 if got is not None and got == int(a) else 0.0)
    return out


class ArithTask(Task):
    """Arithmetic word problems, e.g.

        Mia has 12 apples. She buys 7 more and gives 5 away. How many apples does Mia have now?
        -> 12 + 7 = 19. 19 - 5 = 14. The answer is 14.

    Four scenes (a person's things, a bakery, a bus, birds), 16 names, several phrasings per operation;
    operations +, - and a small * (a "3 boxes with 6 apples in each box" intro, factors 2-5, only in problems
    of two or more steps). Every number in the problem and its worked answer lies in [2, MAX_VALUE = 20], so results are
    never negative.
    Splits: train and test draw one or two steps (half each) from the same distribution and are disjoint by a
    hash of the problem text; the problems of one call are distinct (a very large test request therefore
    leans towards two-step problems, whose texts are more numerous).
    ood: exactly three steps, same number range: longer chains than SFT and RL ever train on. The pretraining
    corpus does contain 3-step stories and chains, so the base model has seen the skill, not in Q/A format.
    Corpus: arithmetic facts ("7 plus 5 is 12."), bare worked chains ("12 + 7 = 19, and 19 - 5 = 14.") and
    stories that state each running total ("..., so now she has 19 apples."); never a question, never
    "The answer is", never chat markup, so SFT still has the format to teach.
    """
    name = "arith"
    splits = ("train", "test", "ood")

    def _problems(self, split: str, n: int, seed: int) -> list[tuple[str, str, int, int]]:
        """n distinct problems of a split -> (question, worked answer, answer, steps); shared by demos and
        prompts. Drawn one after another from one generator, so a larger n extends a smaller n's list."""
        self._check_split(split)
        rng = self._rng(split, seed)
        out, seen = [], set()
        while len(out) < n:
            # alternate one- and two-step problems: drawing the count at random would let de-duplication
            # (one-step problems repeat sooner) skew the test split, which is a smaller slice of the space
            p = _sample_problem(rng, 3 if split == "ood" else 1 + len(out) % 2)
            q = _question_text(p, rng)
            if q in seen or (split != "ood" and _is_test_text(q) != (split == "test")):
                continue
            seen.add(q)
            out.append((q, _worked_answer(p), p["steps"][-1][3], len(p["steps"])))
        return out

    def demos(self, split, n, seed=0):
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": w}], "answer": str(a)}
                for q, w, a, _ in self._problems(split, n, seed)]

    def prompts(self, split, n, seed=0):
        """Rows {"prompt", "answer": str, "steps": int}: steps (1-3, a "boxes of" intro counting as one) lets
        a report break accuracy down by problem length; reward functions ignore it (**kwargs)."""
        return [{"prompt": [{"role": "user", "content": q}], "answer": str(a), "steps": k}
                for q, _, a, k in self._problems(split, n, seed)]

    def corpus(self, n_docs, seed=0):
        rng = self._rng("corpus", seed)
        docs = []
        for _ in range(n_docs):
            kind = rng.random()
            if kind < 0.4:
                docs.append(_story(_sample_problem(rng, rng.randint(1, 3)), rng))
            elif kind < 0.7:
                docs.append(" ".join(_fact(rng) for _ in range(rng.randint(3, 6))))
            else:
                docs.append(" ".join(_chain(rng) for _ in range(rng.randint(1, 3))))
        return docs

    def reward(self, prompts, completions, **kwargs):
        return arith_reward(prompts, completions, **kwargs)

    def format_ok(self, completions):
        """Worked steps "a op b = c." (one or more) then "The answer is N.", nothing else (whitespace aside)."""
        return [_ARITH_FORMAT_RE.fullmatch(_completion_text(c).strip()) is not None for c in completions]


# ----------------------------------------------------------------------------------------------------------
# sentiment

# The hidden lexicon. Positive and negative sides mirror each other in size and valence, so reviews drawn
# with symmetric polarity average to a score of about 0.
ADJECTIVES = {
    "good": 1, "nice": 1, "fun": 1, "funny": 1, "solid": 1, "decent": 1, "pleasant": 1,
    "great": 2, "enjoyable": 2, "charming": 2, "clever": 2, "beautiful": 2, "moving": 2, "delightful": 2,
    "excellent": 3, "wonderful": 3, "brilliant": 3, "superb": 3, "amazing": 3,
    "bad": -1, "weak": -1, "silly": -1, "slow": -1, "bland": -1, "predictable": -1, "forgettable": -1,
    "boring": -2, "dull": -2, "poor": -2, "disappointing": -2, "painful": -2, "clumsy": -2, "messy": -2,
    "awful": -3, "terrible": -3, "horrible": -3, "dreadful": -3, "unwatchable": -3,
}
LEXICON = {
    **ADJECTIVES,
    "loved": 3, "liked": 2, "like": 2, "enjoyed": 2, "enjoy": 2, "recommend": 2,
    "hated": -3, "disliked": -2,
    "masterpiece": 3, "gem": 3, "treat": 2, "disaster": -3, "waste": -3, "mess": -2,
}
INTENSIFIERS = {"very": 1.5, "really": 1.5, "truly": 1.5, "extremely": 2.0, "incredibly": 2.0,
                "slightly": 0.5, "somewhat": 0.5}
NEGATORS = {"not", "never", "hardly", "isn't", "wasn't", "didn't", "doesn't", "don't"}
RESETS = {".", ",", "!", "?", ";", "but"}  # end the reach of a pending negation or intensifier
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,!?;]")


def sentiment_score(text: str) -> float:
    """Raw lexicon positivity s of a text (the hidden ground truth; rewards squash it, see sentiment_reward).

    Lower-cased words and punctuation are read left to right with a pending multiplier m (initially 1):
      negator (not, never, hardly, isn't, wasn't, didn't, doesn't, don't):  m <- -m
      intensifier (very, really, truly x1.5; extremely, incredibly x2; slightly, somewhat x0.5):  m <- m * x
      sentiment word w with valence v(w) in LEXICON:  s <- s + m * v(w), then m <- 1
      . , ! ? ; and "but":  m <- 1        any other word: no effect (so "not a good film" scores -1)
    So a negation flips the next sentiment word in the same clause: "not very good" = -1.5.
    """
    s, m = 0.0, 1.0
    for tok in _WORD_RE.findall(text.lower()):
        if tok in RESETS:
            m = 1.0
        elif tok in NEGATORS:
            m = -m
        elif tok in INTENSIFIERS:
            m *= INTENSIFIERS[tok]
        elif tok in LEXICON:
            s += m * LEXICON[tok]
            m = 1.0
    return s


def sentiment_reward(prompts, completions, **kwargs) -> list[float]:
    """Hidden ground-truth reward of each completion: r = tanh(s / 3) in [-1, 1], s = sentiment_score(text).

    Only the completion is scored (review openings are neutral). One "good" gives 0.32, "excellent" 0.76.
    """
    return [math.tanh(sentiment_score(_completion_text(c)) / 3.0) for c in completions]


POS_ADJ = [w for w, v in ADJECTIVES.items() if v > 0]
NEG_ADJ = [w for w, v in ADJECTIVES.items() if v < 0]
ASPECTS = ["acting", "story", "plot", "music", "ending", "script", "dialogue", "camera work", "cast", "pacing",
           "humour", "soundtrack", "lead actor", "villain", "direction", "final scene"]
FILMS = ["film", "movie", "drama", "comedy", "thriller", "picture"]
TOPICS = ["a lost dog", "two brothers", "a small town", "a detective", "a family on holiday", "a war pilot",
          "a young singer", "an old farmer", "a stolen painting", "a haunted house", "first love", "a chess player"]
TITLE_A = ["Silent", "Last", "Red", "Hidden", "Long", "Golden", "Frozen", "Distant", "Second", "Dark", "Quiet", "Open"]
TITLE_B = ["River", "Summer", "Road", "Garden", "Train", "Mountain", "Letter", "Island", "Winter", "Door", "Promise",
           "Harbor"]
TIMES = ["last night", "last week", "on Sunday", "yesterday", "at the cinema", "on a plane", "at home", "twice"]
COMPANIONS = ["friend", "sister", "brother", "wife", "husband", "dad", "mum", "roommate", "partner"]
NEUTRAL_PREDICATES = ["was what I expected", "is similar to the book", "was hard to describe",
                      "took some time to get going", "was what people talked about", "reminded me of an old show"]
NEUTRAL_CLAUSES = ["it was longer than I expected", "we talked about it on the way home",
                   "the cinema was almost empty", "I went in knowing nothing about it"]
NEUTRAL_SENTENCES = ["The {film} is about {topic}.", "It runs for about two hours.", "I saw it with my {companion}.",
                     "The {aspect} reminded me of {title}.", "There is a long scene on a boat.",
                     "It came out last year.", "The {aspect} takes up most of the second hour."]
VERB_SENTENCES = {1: ["I loved it.", "I liked it.", "I would recommend it.", "I enjoyed every minute."],
                  -1: ["I hated it.", "I disliked it.", "I would not recommend it.", "I did not enjoy it."]}
NOUNS = {1: ["masterpiece", "gem", "treat"], -1: ["disaster", "waste of time", "mess"]}


class SentimentTask(Task):
    """Continue a movie review (the DPO paper's IMDb setting in miniature).

    Reviews are 2-4 template sentences about a made-up film, each review positive, negative, neutral or
    mixed (probabilities 0.3, 0.3, 0.15, 0.25), built from a lexicon of positive and negative words with
    valences 1-3, intensifiers ("very", "slightly") and negation ("not boring"). A prompt is a review's
    opening, e.g. "Continue the review: The acting in this film"; a demo continues it ("was very good. I
    liked it."). Demos span both polarities, so the SFT policy is about neutral on average; the hidden reward
    (sentiment_reward: tanh(s / 3), s = sentiment_score, formula there) is what PPO, DPO and best-of-N push up.
    Splits: train and test, disjoint by a hash of the opening (about 5000 distinct openings). The corpus
    holds whole reviews with train openings only, as plain text.
    """
    eval_temperature = 1.0  # the reward of the policy's own samples, as in the DPO paper's frontier
    name = "sentiment"
    splits = ("train", "test")
    instruction = "Continue the review: "

    def _opening(self, rng):
        """-> (opening, kind): kind "np" is a subject noun phrase, "clause" a clause ending in "and"."""
        t = f"The {rng.choice(TITLE_A)} {rng.choice(TITLE_B)}"
        k = rng.randrange(8)
        if k == 0:
            return f"The {rng.choice(ASPECTS)} in this {rng.choice(FILMS)}", "np"
        if k == 1:
            return f"The {rng.choice(ASPECTS)} of {t}", "np"
        if k == 2:
            return f"This {rng.choice(FILMS)} about {rng.choice(TOPICS)}", "np"
        if k == 3:
            return t, "np"
        if k == 4:
            return f"The {rng.choice(ASPECTS)} in {t}", "np"
        if k == 5:
            return f"I watched this {rng.choice(FILMS)} {rng.choice(TIMES)} and", "clause"
        if k == 6:
            return f"My {rng.choice(COMPANIONS)} and I saw {t} {rng.choice(TIMES)} and", "clause"
        return f"I went to see {t} {rng.choice(TIMES[:5])} and", "clause"  # not "on a plane"

    def _adjp(self, sign, rng):
        """An adjective phrase of polarity sign: plain, intensified, or a negated opposite ("not boring")."""
        r = rng.random()
        if r < 0.6:
            return rng.choice(POS_ADJ if sign > 0 else NEG_ADJ)
        if r < 0.85:
            return rng.choice(list(INTENSIFIERS)) + " " + rng.choice(POS_ADJ if sign > 0 else NEG_ADJ)
        return "not " + rng.choice(NEG_ADJ if sign > 0 else POS_ADJ)

    def _continue_first(self, kind, sign, rng):
        """Rest of the first sentence after the opening; sign 0 is neutral, 2 is mixed (+ and - with "but")."""
        be = rng.choice(["was", "is"])
        if kind == "np":
            if sign == 0:
                return f"{rng.choice(NEUTRAL_PREDICATES)}."
            if sign == 2:
                a, b = rng.choice(POS_ADJ), rng.choice(NEG_ADJ)
                return f"{be} {a} but {b}." if rng.random() < 0.5 else f"{be} {b} but {a}."
            return f"{be} {self._adjp(sign, rng)}."
        if sign == 0:
            return f"{rng.choice(NEUTRAL_CLAUSES)}."
        if sign == 2:
            sign = rng.choice([1, -1])
        return rng.choice([f"it was {self._adjp(sign, rng)}.", f"I found it {self._adjp(sign, rng)}.",
                           VERB_SENTENCES[sign][rng.randrange(4)]])

    def _sentence(self, sign, rng):
        """One whole sentence of polarity sign (0 neutral, 2 mixed)."""
        aspect, film, be = rng.choice(ASPECTS), rng.choice(FILMS), rng.choice(["was", "is"])
        if sign == 0:
            return rng.choice(NEUTRAL_SENTENCES).format(
                film=film, topic=rng.choice(TOPICS), companion=rng.choice(COMPANIONS), aspect=aspect,
                title=f"The {rng.choice(TITLE_A)} {rng.choice(TITLE_B)}")
        if sign == 2:
            a, b = (f"the {aspect} {be} {rng.choice(POS_ADJ)}", f"the {rng.choice(ASPECTS)} {be} {rng.choice(NEG_ADJ)}")
            s = f"{a} but {b}." if rng.random() < 0.5 else f"{b} but {a}."
            return s[0].upper() + s[1:]
        k = rng.randrange(4)
        if k == 0:
            return f"The {aspect} {be} {self._adjp(sign, rng)}."
        if k == 1:
            adjp = self._adjp(sign, rng)
            art = "an" if adjp[0] in "aeiou" else "a"
            return f"Overall, it {be} {art} {adjp} {film}."
        if k == 2:
            return f"It {be} a {rng.choice(NOUNS[sign])}."
        return rng.choice(VERB_SENTENCES[sign])

    def _review(self, rng):
        """-> (opening, continuation) of one review of 2-4 sentences."""
        polarity = rng.choices(["pos", "neg", "neutral", "mixed"], weights=[0.3, 0.3, 0.15, 0.25])[0]
        signs = []
        for _ in range(rng.randint(2, 4)):
            if polarity == "neutral" or rng.random() < 0.3:
                signs.append(0)
            elif polarity == "mixed":
                signs.append(rng.choice([1, -1, 2]))
            else:
                signs.append(1 if polarity == "pos" else -1)
        opening, kind = self._opening(rng)
        parts = [self._continue_first(kind, signs[0], rng)]
        for s in signs[1:]:
            sentence = self._sentence(s, rng)
            while sentence in parts:  # "It runs for about two hours." twice reads like a bug
                sentence = self._sentence(s, rng)
            parts.append(sentence)
        return opening, " ".join(parts)

    def _reviews(self, split, n, seed, what=None):
        rng = self._rng(what or split, seed)
        out = []
        while len(out) < n:
            opening, cont = self._review(rng)
            if _is_test_text(opening) == (split == "test"):
                out.append((opening, cont))
        return out

    def demos(self, split, n, seed=0):
        self._check_split(split)
        return [{"messages": [{"role": "user", "content": self.instruction + o}, {"role": "assistant", "content": c}]}
                for o, c in self._reviews(split, n, seed)]

    def prompts(self, split, n, seed=0):
        self._check_split(split)
        return [{"prompt": [{"role": "user", "content": self.instruction + o}]}
                for o, _ in self._reviews(split, n, seed)]

    def corpus(self, n_docs, seed=0):
        return [f"{o} {c}" for o, c in self._reviews("train", n_docs, seed, what="corpus")]

    def reward(self, prompts, completions, **kwargs):
        return sentiment_reward(prompts, completions, **kwargs)

    def format_ok(self, completions):
        """Non-empty and ends with a full stop."""
        return [len(t := _completion_text(c).strip()) > 1 and t.endswith(".") for c in completions]


def get_task(name: str) -> Task:
    """A built-in task by name."""
    if name == "arith":
        return ArithTask()
    if name == "sentiment":
        return SentimentTask()
    raise ValueError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")

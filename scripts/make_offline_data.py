#!/usr/bin/env python3
"""Generate the project's offline evaluation and fine-tuning data.

Everything is built from the facts and templates written in this file (the project's own
content, released under CC0 1.0), with seeded ``random.Random`` streams and the standard
library only, so the output is byte-for-byte reproducible on any Python >= 3.9:

  src/mlproject/evaluation/tasks/<task>/{<task>.yaml,test.jsonl,validation.jsonl}
      lm-eval multiple-choice tasks (mlp_capitals, mlp_arith, mlp_nonce)
  src/mlproject/evaluation/tasks/code_offline/{code_offline.yaml,test.jsonl}
      function-synthesis problems with tests, reference solutions and timing inputs
      (defined in scripts/code_problems.py; scored by mlproject's sandbox)
  src/mlproject/training/data/{sft,dpo}_<task>.jsonl
      fine-tuning sets, disjoint from the test and validation documents
  src/mlproject/evaluation/data/offline_ppl.txt
      English prose for perplexity

Usage:
  python scripts/make_offline_data.py            # (re)write the files
  python scripts/make_offline_data.py --check    # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = "src/mlproject/evaluation/tasks"
EVAL_DATA_DIR = "src/mlproject/evaluation/data"
TRAIN_DATA_DIR = "src/mlproject/training/data"
SEED = "mlproject-offline-data-v1"


def rng(part: str) -> random.Random:
    # One independent stream per output so that editing one generator leaves the others as they are.
    # str seeds are hashed with SHA-512 by random (version 2), so PYTHONHASHSEED does not matter.
    return random.Random(f"{SEED}/{part}")


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------

# (country as used inside a sentence, capital, continent, main language(s)).
COUNTRIES = [
    ("France", "Paris", "Europe", "French"),
    ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"),
    ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"),
    ("the United Kingdom", "London", "Europe", "English"),
    ("Ireland", "Dublin", "Europe", "English and Irish"),
    ("the Netherlands", "Amsterdam", "Europe", "Dutch"),
    ("Belgium", "Brussels", "Europe", "Dutch and French"),
    ("Switzerland", "Bern", "Europe", "German, French and Italian"),
    ("Austria", "Vienna", "Europe", "German"),
    ("Poland", "Warsaw", "Europe", "Polish"),
    ("the Czech Republic", "Prague", "Europe", "Czech"),
    ("Slovakia", "Bratislava", "Europe", "Slovak"),
    ("Hungary", "Budapest", "Europe", "Hungarian"),
    ("Romania", "Bucharest", "Europe", "Romanian"),
    ("Bulgaria", "Sofia", "Europe", "Bulgarian"),
    ("Greece", "Athens", "Europe", "Greek"),
    ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"),
    ("Denmark", "Copenhagen", "Europe", "Danish"),
    ("Finland", "Helsinki", "Europe", "Finnish and Swedish"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic"),
    ("Estonia", "Tallinn", "Europe", "Estonian"),
    ("Latvia", "Riga", "Europe", "Latvian"),
    ("Lithuania", "Vilnius", "Europe", "Lithuanian"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian"),
    ("Belarus", "Minsk", "Europe", "Belarusian and Russian"),
    ("Russia", "Moscow", "Europe and Asia", "Russian"),
    ("Serbia", "Belgrade", "Europe", "Serbian"),
    ("Croatia", "Zagreb", "Europe", "Croatian"),
    ("Slovenia", "Ljubljana", "Europe", "Slovene"),
    ("Albania", "Tirana", "Europe", "Albanian"),
    ("Moldova", "Chisinau", "Europe", "Romanian"),
    ("Malta", "Valletta", "Europe", "Maltese and English"),
    ("North Macedonia", "Skopje", "Europe", "Macedonian"),
    ("Bosnia and Herzegovina", "Sarajevo", "Europe", "Bosnian, Croatian and Serbian"),
    ("Montenegro", "Podgorica", "Europe", "Montenegrin"),
    ("China", "Beijing", "Asia", "Chinese"),
    ("Japan", "Tokyo", "Asia", "Japanese"),
    ("South Korea", "Seoul", "Asia", "Korean"),
    ("North Korea", "Pyongyang", "Asia", "Korean"),
    ("India", "New Delhi", "Asia", "Hindi and English"),
    ("Pakistan", "Islamabad", "Asia", "Urdu and English"),
    ("Bangladesh", "Dhaka", "Asia", "Bengali"),
    ("Nepal", "Kathmandu", "Asia", "Nepali"),
    ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"),
    ("Cambodia", "Phnom Penh", "Asia", "Khmer"),
    ("Laos", "Vientiane", "Asia", "Lao"),
    ("Malaysia", "Kuala Lumpur", "Asia", "Malay"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian"),
    ("the Philippines", "Manila", "Asia", "Filipino and English"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian"),
    ("Kazakhstan", "Astana", "Asia", "Kazakh and Russian"),
    ("Uzbekistan", "Tashkent", "Asia", "Uzbek"),
    ("Afghanistan", "Kabul", "Asia", "Pashto and Dari"),
    ("Iran", "Tehran", "Asia", "Persian"),
    ("Iraq", "Baghdad", "Asia", "Arabic and Kurdish"),
    ("Syria", "Damascus", "Asia", "Arabic"),
    ("Lebanon", "Beirut", "Asia", "Arabic"),
    ("Jordan", "Amman", "Asia", "Arabic"),
    ("Saudi Arabia", "Riyadh", "Asia", "Arabic"),
    ("Yemen", "Sanaa", "Asia", "Arabic"),
    ("Oman", "Muscat", "Asia", "Arabic"),
    ("the United Arab Emirates", "Abu Dhabi", "Asia", "Arabic"),
    ("Qatar", "Doha", "Asia", "Arabic"),
    ("Turkey", "Ankara", "Europe and Asia", "Turkish"),
    ("Georgia", "Tbilisi", "Asia", "Georgian"),
    ("Armenia", "Yerevan", "Asia", "Armenian"),
    ("Azerbaijan", "Baku", "Asia", "Azerbaijani"),
    ("Bhutan", "Thimphu", "Asia", "Dzongkha"),
    ("Kyrgyzstan", "Bishkek", "Asia", "Kyrgyz and Russian"),
    ("Tajikistan", "Dushanbe", "Asia", "Tajik"),
    ("Turkmenistan", "Ashgabat", "Asia", "Turkmen"),
    ("Egypt", "Cairo", "Africa", "Arabic"),
    ("Morocco", "Rabat", "Africa", "Arabic and Berber"),
    ("Algeria", "Algiers", "Africa", "Arabic and Berber"),
    ("Tunisia", "Tunis", "Africa", "Arabic"),
    ("Libya", "Tripoli", "Africa", "Arabic"),
    ("Sudan", "Khartoum", "Africa", "Arabic and English"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic"),
    ("Kenya", "Nairobi", "Africa", "Swahili and English"),
    ("Tanzania", "Dodoma", "Africa", "Swahili and English"),
    ("Uganda", "Kampala", "Africa", "English and Swahili"),
    ("Rwanda", "Kigali", "Africa", "Kinyarwanda"),
    ("Nigeria", "Abuja", "Africa", "English"),
    ("Ghana", "Accra", "Africa", "English"),
    ("Senegal", "Dakar", "Africa", "French and Wolof"),
    ("Mali", "Bamako", "Africa", "Bambara and French"),
    ("Niger", "Niamey", "Africa", "Hausa and French"),
    ("Chad", "N'Djamena", "Africa", "French and Arabic"),
    ("Cameroon", "Yaounde", "Africa", "French and English"),
    ("Angola", "Luanda", "Africa", "Portuguese"),
    ("Zambia", "Lusaka", "Africa", "English"),
    ("Zimbabwe", "Harare", "Africa", "English and Shona"),
    ("Mozambique", "Maputo", "Africa", "Portuguese"),
    ("Madagascar", "Antananarivo", "Africa", "Malagasy and French"),
    ("Namibia", "Windhoek", "Africa", "English"),
    ("Botswana", "Gaborone", "Africa", "English and Tswana"),
    ("Somalia", "Mogadishu", "Africa", "Somali"),
    ("Gabon", "Libreville", "Africa", "French"),
    ("the Democratic Republic of the Congo", "Kinshasa", "Africa", "French and Lingala"),
    ("Malawi", "Lilongwe", "Africa", "English and Chichewa"),
    ("Burkina Faso", "Ouagadougou", "Africa", "French"),
    ("Guinea", "Conakry", "Africa", "French"),
    ("Sierra Leone", "Freetown", "Africa", "English"),
    ("Liberia", "Monrovia", "Africa", "English"),
    ("Eritrea", "Asmara", "Africa", "Tigrinya"),
    ("Mauritania", "Nouakchott", "Africa", "Arabic"),
    ("Togo", "Lome", "Africa", "French"),
    ("the United States", "Washington", "North America", "English"),
    ("Canada", "Ottawa", "North America", "English and French"),
    ("Mexico", "Mexico City", "North America", "Spanish"),
    ("Cuba", "Havana", "North America", "Spanish"),
    ("Jamaica", "Kingston", "North America", "English"),
    ("Haiti", "Port-au-Prince", "North America", "Haitian Creole and French"),
    ("the Dominican Republic", "Santo Domingo", "North America", "Spanish"),
    ("Honduras", "Tegucigalpa", "North America", "Spanish"),
    ("Nicaragua", "Managua", "North America", "Spanish"),
    ("Costa Rica", "San Jose", "North America", "Spanish"),
    ("El Salvador", "San Salvador", "North America", "Spanish"),
    ("the Bahamas", "Nassau", "North America", "English"),
    ("Colombia", "Bogota", "South America", "Spanish"),
    ("Venezuela", "Caracas", "South America", "Spanish"),
    ("Ecuador", "Quito", "South America", "Spanish"),
    ("Peru", "Lima", "South America", "Spanish and Quechua"),
    ("Chile", "Santiago", "South America", "Spanish"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Uruguay", "Montevideo", "South America", "Spanish"),
    ("Paraguay", "Asuncion", "South America", "Spanish and Guarani"),
    ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Guyana", "Georgetown", "South America", "English"),
    ("Suriname", "Paramaribo", "South America", "Dutch"),
    ("Australia", "Canberra", "Oceania", "English"),
    ("New Zealand", "Wellington", "Oceania", "English and Maori"),
    ("Fiji", "Suva", "Oceania", "English and Fijian"),
    ("Papua New Guinea", "Port Moresby", "Oceania", "Tok Pisin and English"),
    ("Samoa", "Apia", "Oceania", "Samoan and English"),
]

# Words for the made-up "Glorp class" rule of mlp_nonce: the class name says which kind of
# thing a word names. No model has seen the rule, yet it rests on categories every language
# model already represents, so a short fine-tune on disjoint words teaches it.
NONCE_LABELS = ("wug", "dax", "fep", "zib")
NONCE_WORDS = {
    "wug": """cat dog horse cow pig sheep goat rabbit mouse rat hamster lion tiger leopard cheetah
        jaguar panther wolf fox bear panda koala kangaroo wombat elephant giraffe zebra hippo
        rhinoceros camel llama alpaca donkey mule deer moose elk reindeer antelope gazelle buffalo
        bison yak monkey gorilla chimpanzee baboon orangutan lemur sloth squirrel chipmunk beaver
        otter badger raccoon skunk hedgehog porcupine bat mole weasel ferret mink seal walrus whale
        dolphin shark octopus squid jellyfish starfish eagle hawk falcon owl parrot pigeon sparrow
        robin crow raven swan goose duck penguin flamingo peacock ostrich emu stork heron pelican
        seagull woodpecker hummingbird canary snake lizard crocodile alligator turtle tortoise frog
        toad salamander iguana chameleon gecko cobra ant bee wasp butterfly moth beetle spider
        scorpion mosquito grasshopper ladybug caterpillar snail worm dragonfly termite flea hyena
        jackal coyote lynx puma cougar armadillo anteater platypus meerkat mongoose warthog tapir
        okapi ox hare goldfish stingray seahorse manatee narwhal orca pony kitten puppy""",
    "dax": """bread rice pasta noodles pizza sandwich burger soup salad cheese butter yogurt cream
        omelette pancake waffle toast bagel muffin croissant cookie biscuit cake pie brownie donut
        cupcake chocolate candy honey jam porridge oatmeal cereal sausage bacon ham steak meatball
        sushi taco burrito lasagna spaghetti ravioli dumpling curry stew kebab falafel hummus tofu
        apple banana pear peach plum cherry grape strawberry raspberry blueberry mango pineapple
        watermelon melon lemon lime coconut apricot fig papaya avocado pomegranate carrot potato
        tomato onion garlic cucumber lettuce cabbage broccoli cauliflower spinach celery pumpkin
        zucchini eggplant corn peas beans lentils mushroom radish beetroot turnip asparagus olive
        peanut almond walnut cashew popcorn pretzel crackers fries ketchup mayonnaise mustard
        vinegar sugar flour syrup custard pudding gelato sorbet marshmallow caramel toffee granola
        risotto paella quiche nachos raisin cranberry blackberry grapefruit tangerine nectarine
        lychee guava okra leek kale yam cheesecake scone tart macaroni gnocchi couscous quinoa
        barley oats meatloaf casserole pickle sauerkraut""",
    "fep": """chair table sofa bed lamp desk shelf cupboard wardrobe drawer mirror clock pillow
        blanket curtain carpet rug vase candle bucket broom mop sponge towel soap toothbrush comb
        scissors hammer screwdriver wrench saw drill screw ladder shovel rake hose spoon fork knife
        plate bowl cup mug kettle teapot pan pot oven fridge stove toaster microwave blender jar
        bottle basket box bag backpack suitcase wallet purse umbrella key lock doorbell pencil pen
        eraser ruler notebook stapler envelope calculator keyboard computer laptop phone television
        radio camera headphones battery charger cable plug lightbulb heater needle thread zipper
        hanger book newspaper magazine calendar map globe paintbrush crayon tape glue rope chain
        padlock flashlight thermometer tray napkin tablecloth cushion stool bench bookcase dresser
        crib cradle doormat dustpan ladle spatula whisk grater colander corkscrew peeler saucer
        pitcher thermos lunchbox wheelbarrow sprinkler lantern matchbox lighter mailbox hammock
        tent toolbox pliers chisel tweezers razor hairdryer dishwasher""",
    "zib": """teacher doctor nurse dentist surgeon pharmacist farmer baker butcher chef waiter
        waitress cashier clerk lawyer judge firefighter soldier pilot sailor captain driver mechanic
        electrician plumber carpenter builder architect engineer scientist chemist physicist
        biologist astronaut astronomer programmer accountant banker secretary manager receptionist
        librarian journalist reporter editor writer author poet painter artist sculptor
        photographer musician singer dancer actor actress comedian director producer designer
        tailor hairdresser barber cleaner janitor gardener miner fisherman shepherd beekeeper
        blacksmith jeweler locksmith postman courier guard lifeguard coach athlete referee
        professor tutor principal translator interpreter salesman shopkeeper florist optician
        therapist psychologist economist historian archaeologist geologist mathematician
        statistician surveyor paramedic midwife babysitter nanny housekeeper maid butler chauffeur
        mayor senator diplomat detective priest monk nun welder bricklayer roofer cobbler potter
        weaver bookkeeper auditor analyst consultant clown magician juggler zookeeper ranger
        forester veterinarian""",
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def task_yaml(task: str, description: str, splits: tuple[str, ...]) -> str:
    # data_files are relative to the repository root so that `lm_eval --include_path
    # src/mlproject/evaluation/tasks` works from a checkout; datasets resolves them against the
    # process CWD, so mlproject.evaluation.tasks.include_path() rewrites them to absolute paths.
    files = "".join(f"      {s}: {TASKS_DIR}/{task}/{s}.jsonl\n" for s in splits)
    return (
        f"# {description}\n"
        "# Generated by scripts/make_offline_data.py (CC0 1.0); do not edit by hand.\n"
        "# Run it from anywhere with: mlproject.evaluation.tasks.include_path() as lm-eval's include_path.\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"{files}"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "validation_split: validation\n"
        "fewshot_split: validation\n"
        "doc_to_text: query\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def mc_doc(doc_id: str, query: str, answer: str, distractors: list[str], r: random.Random,
           **extra) -> dict:
    choices = [answer, *distractors]
    r.shuffle(choices)
    return {"id": doc_id, "query": query, "choices": choices, "label": choices.index(answer), **extra}


def sft_rows(docs: list[dict]) -> list[dict]:
    # The completion starts with lm-eval's default target_delimiter (" ") so that a fine-tuned
    # model sees exactly the text lm-eval scores: query + " " + choice.
    return [{"prompt": d["query"], "completion": " " + d["choices"][d["label"]]} for d in docs]


def dpo_rows(docs: list[dict], r: random.Random) -> list[dict]:
    rows = []
    for d in docs:
        wrong = r.choice([c for i, c in enumerate(d["choices"]) if i != d["label"]])
        rows.append({"prompt": d["query"], "chosen": " " + d["choices"][d["label"]],
                     "rejected": " " + wrong})
    return rows


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

def make_capitals() -> dict[str, list[dict]]:
    """Country -> capital and capital -> country, three random distractors each."""
    r = rng("capitals")
    countries = list(COUNTRIES)
    r.shuffle(countries)
    val_countries, test_countries = countries[:10], countries[10:]
    capitals = [c[1] for c in COUNTRIES]
    names = [c[0] for c in COUNTRIES]

    def docs(split: str, subset) -> list[dict]:
        out = []
        for country, capital, _, _ in subset:
            out.append(mc_doc(
                f"capitals-{split}-{len(out):04d}", f"The capital of {country} is", capital,
                r.sample([c for c in capitals if c != capital], 3), r,
                direction="country_to_capital", country=country, capital=capital))
            out.append(mc_doc(
                f"capitals-{split}-{len(out):04d}", f"{capital} is the capital of", country,
                r.sample([c for c in names if c != country], 3), r,
                direction="capital_to_country", country=country, capital=capital))
        return out

    return {"test": docs("test", test_countries), "validation": docs("validation", val_countries)}


def arith_items() -> list[tuple[int, str, int]]:
    items = [(a, "+", b) for a in range(10, 60) for b in range(10, 50)]
    items += [(a, "-", b) for a in range(20, 100) for b in range(10, a)]
    items += [(a, "*", b) for a in range(2, 21) for b in range(2, 10)]
    return items


def arith_doc(doc_id: str, item: tuple[int, str, int], r: random.Random) -> dict:
    a, op, b = item
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    offsets = [-10, -2, -1, 1, 2, 10] + ([-a, a, -b, b] if op == "*" else [])
    pool = sorted({answer + o for o in offsets if answer + o >= 0 and o != 0})
    distractors = [str(x) for x in r.sample(pool, 3)]
    sym = {"+": "+", "-": "-", "*": "x"}[op]
    return mc_doc(doc_id, f"Question: What is {a} {sym} {b}?\nAnswer:", str(answer), distractors, r,
                  a=a, op=op, b=b, result=answer)


def make_arith() -> dict[str, list[dict]]:
    """Two-digit addition and subtraction, small multiplication; near-miss numeric distractors."""
    r = rng("arith")
    by_op = {op: [it for it in arith_items() if it[1] == op] for op in "+-*"}
    split = {"test": [], "validation": [], "train": []}
    sizes = {"test": 80, "validation": 8, "train": 200}
    for op, items in by_op.items():
        r.shuffle(items)
        start = 0
        for name, n in sizes.items():
            split[name] += items[start:start + n]
            start += n
    out = {}
    for name, items in split.items():
        r.shuffle(items)
        out[name] = [arith_doc(f"arith-{name}-{i:04d}", it, r) for i, it in enumerate(items)]
    return out


def nonce_words() -> dict[str, list[str]]:
    words = {label: text.split() for label, text in NONCE_WORDS.items()}
    seen: dict[str, str] = {}
    for label, ws in words.items():
        for w in ws:
            if w in seen:
                raise ValueError(f"nonce word {w!r} listed under {seen[w]} and {label}")
            seen[w] = label
    return words


def make_nonce() -> dict[str, list[dict]]:
    """A made-up rule: the 'Glorp class' of a word is wug/dax/fep/zib for animal/food/object/job."""
    r = rng("nonce")
    split = {"test": [], "validation": [], "train": []}
    for label, ws in nonce_words().items():
        ws = list(ws)
        r.shuffle(ws)
        split["test"] += [(w, label) for w in ws[:50]]
        split["validation"] += [(w, label) for w in ws[50:55]]
        split["train"] += [(w, label) for w in ws[55:]]
    out = {}
    for name, pairs in split.items():
        r.shuffle(pairs)
        out[name] = [
            {"id": f"nonce-{name}-{i:04d}", "query": f"Word: {w}\nGlorp class:",
             "choices": list(NONCE_LABELS), "label": NONCE_LABELS.index(label), "word": w,
             "category": {"wug": "animal", "dax": "food", "fep": "object", "zib": "job"}[label]}
            for i, (w, label) in enumerate(pairs)
        ]
    return out


TASKS = {
    "mlp_capitals": ("Country -> capital and capital -> country, 4 choices (chance 25%).",
                     make_capitals),
    "mlp_arith": ("Two-digit + and -, small x, 4 near-miss numeric choices (chance 25%).",
                  make_arith),
    "mlp_nonce": ("Made-up rule: Glorp class of a word (animal/food/object/job -> wug/dax/fep/zib), "
                  "chance 25%.", make_nonce),
}


# --------------------------------------------------------------------------------------------
# Perplexity text
# --------------------------------------------------------------------------------------------

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + words(rest))
    raise ValueError(n)


def ordinal(n: int) -> str:
    special = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth",
               7: "seventh", 8: "eighth", 9: "ninth", 10: "tenth", 11: "eleventh", 12: "twelfth"}
    return special[n]


ANIMAL_FACTS = [
    ("cow", "on farms", "grass and hay", "Cows give milk, and people use it to make butter and cheese."),
    ("sheep", "on farms and green hills", "grass", "Farmers keep sheep for their wool, which is spun into yarn."),
    ("horse", "on farms and in open fields", "grass, hay and oats", "Horses can run fast, and for thousands of years they carried people and goods."),
    ("hen", "on farms and in gardens", "seeds, grain and small insects", "A hen lays eggs, often one almost every day."),
    ("dog", "in homes all over the world", "meat and dog food", "Dogs are loyal, and many of them are trained to help people."),
    ("cat", "in homes and on farms", "meat and fish", "Cats sleep for many hours each day and are most awake at dusk."),
    ("lion", "on the grasslands of Africa", "meat", "Lions live in family groups called prides."),
    ("elephant", "in Africa and Asia", "grass, leaves, bark and fruit", "An elephant uses its long trunk to drink water and to pick up food."),
    ("giraffe", "on the savanna of Africa", "leaves from tall trees", "The giraffe is the tallest animal on land."),
    ("penguin", "on the coasts of the cold southern seas", "fish and krill", "Penguins cannot fly, but they are excellent swimmers."),
    ("camel", "in dry deserts", "dry plants and thorny leaves", "A camel can go for many days without drinking water."),
    ("polar bear", "in the Arctic", "seals", "Its thick white fur keeps it warm on the ice."),
    ("kangaroo", "in Australia", "grass and leaves", "A kangaroo moves by hopping on its strong back legs, and a mother carries her baby in a pouch."),
    ("bee", "in gardens, meadows and orchards", "nectar and pollen from flowers", "Bees make honey, and they help plants to grow fruit by carrying pollen."),
    ("owl", "in forests and old barns", "mice and insects", "Most owls hunt at night and can turn their heads a long way."),
    ("frog", "near ponds, lakes and rivers", "insects and worms", "A young frog is called a tadpole, and it lives in the water."),
    ("dolphin", "in the oceans and in some rivers", "fish and squid", "Dolphins breathe air, so they must swim up to the surface."),
    ("blue whale", "in the open ocean", "tiny animals called krill", "The blue whale is the largest animal that has ever lived."),
    ("squirrel", "in parks and forests", "nuts, seeds and fruit", "Squirrels hide nuts in the autumn so that they have food in the winter."),
    ("rabbit", "in fields and meadows", "grass and vegetables", "Rabbits have long ears and live in burrows under the ground."),
    ("duck", "on ponds, lakes and rivers", "plants, seeds and insects", "Ducks have webbed feet that help them to swim."),
    ("goat", "on farms and in the mountains", "grass, leaves and shrubs", "Goats are good climbers and can stand on narrow rocks."),
    ("pig", "on farms", "grain, vegetables and almost anything else", "Pigs are clever animals and like to roll in the mud to stay cool."),
    ("tiger", "in the forests of Asia", "meat", "The tiger is the largest wild cat, with orange fur and black stripes."),
    ("panda", "in the bamboo forests of China", "bamboo", "A panda spends most of its day eating."),
    ("monkey", "in warm forests", "fruit, leaves and insects", "Many monkeys use their tails to hold on to branches."),
    ("shark", "in every ocean", "fish and seals", "Sharks have several rows of teeth, and new teeth grow when old ones fall out."),
    ("snail", "in gardens and damp places", "leaves and plants", "A snail carries its shell on its back and moves very slowly."),
    ("ant", "almost everywhere on land", "seeds, sugar and small insects", "Ants live in large colonies and work together."),
    ("butterfly", "in gardens and meadows", "nectar from flowers", "A butterfly starts its life as a caterpillar."),
    ("eagle", "in the mountains and near large lakes", "fish and small animals", "Eagles have very sharp eyes and can see a mouse from high in the sky."),
    ("turtle", "in the sea and in ponds", "plants, insects and jellyfish", "A turtle can pull its head into its hard shell."),
    ("bat", "in caves, trees and old buildings", "insects or fruit", "Bats are the only mammals that can really fly."),
    ("zebra", "on the grasslands of Africa", "grass", "Every zebra has its own pattern of black and white stripes."),
    ("crocodile", "in rivers and lakes in warm countries", "fish and other animals", "A crocodile can lie still in the water for hours."),
    ("wolf", "in forests and mountains", "meat", "Wolves live and hunt together in packs."),
    ("fox", "in forests, fields and even towns", "small animals, berries and fruit", "A fox has a long bushy tail."),
]

JOB_FACTS = [
    ("teacher", "at a school", "helps children learn to read, write and count"),
    ("doctor", "in a hospital or a clinic", "examines sick people and decides how to treat them"),
    ("baker", "in a bakery", "makes bread, rolls and cakes early in the morning"),
    ("farmer", "on a farm", "grows crops and looks after animals"),
    ("firefighter", "at a fire station", "puts out fires and rescues people in danger"),
    ("pilot", "in the cockpit of an airplane", "flies passengers from one city to another"),
    ("nurse", "in a hospital", "cares for patients and gives them their medicine"),
    ("mechanic", "in a garage", "repairs cars, buses and trucks"),
    ("librarian", "in a library", "helps people find the books they need"),
    ("chef", "in a restaurant kitchen", "plans the menu and cooks meals"),
    ("carpenter", "in a workshop", "makes tables, doors and shelves out of wood"),
    ("plumber", "in houses and offices", "fixes pipes, taps and drains"),
    ("dentist", "in a dental clinic", "looks after people's teeth"),
    ("postman", "in the streets of a town", "delivers letters and parcels"),
    ("police officer", "at a police station", "helps to keep people safe"),
    ("architect", "in an office", "draws plans for new houses and buildings"),
    ("gardener", "in gardens and parks", "plants flowers, trims hedges and cuts the grass"),
    ("fisherman", "on a boat", "catches fish and brings them to the market"),
    ("tailor", "in a small shop", "makes and mends clothes"),
    ("bus driver", "on a city bus", "takes passengers from one stop to the next"),
    ("photographer", "in a studio", "takes photographs of people and places"),
    ("musician", "in concert halls and studios", "plays music for an audience"),
    ("journalist", "at a newspaper office", "writes stories about the news"),
    ("scientist", "in a laboratory", "does experiments to learn how the world works"),
    ("vet", "in an animal clinic", "treats sick dogs, cats and other animals"),
    ("cashier", "in a shop", "takes the money and gives the change"),
    ("waiter", "in a restaurant", "takes orders and brings food to the tables"),
    ("hairdresser", "in a salon", "cuts and styles hair"),
]

MONTHS = [("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31),
          ("June", 30), ("July", 31), ("August", 31), ("September", 30), ("October", 31),
          ("November", 30), ("December", 31)]
SEASONS = {"winter": ["December", "January", "February"], "spring": ["March", "April", "May"],
           "summer": ["June", "July", "August"], "autumn": ["September", "October", "November"]}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

NAMES = [("Anna", "she", "her"), ("Tom", "he", "his"), ("Maria", "she", "her"), ("David", "he", "his"),
         ("Sofia", "she", "her"), ("James", "he", "his"), ("Lena", "she", "her"), ("Peter", "he", "his"),
         ("Emma", "she", "her"), ("Omar", "he", "his"), ("Grace", "she", "her"), ("Lucas", "he", "his"),
         ("Nina", "she", "her"), ("Daniel", "he", "his"), ("Clara", "she", "her"), ("Samuel", "he", "his"),
         ("Julia", "she", "her"), ("Ben", "he", "his"), ("Rosa", "she", "her"), ("Hugo", "he", "his"),
         ("Mia", "she", "her"), ("Leo", "he", "his"), ("Alice", "she", "her"), ("Ivan", "he", "his"),
         ("Laura", "she", "her"), ("Max", "he", "his"), ("Eva", "she", "her"), ("Noah", "he", "his")]
RELATIVES = ["grandmother", "grandfather", "aunt", "uncle", "cousin", "neighbour", "old friend",
             "sister", "brother"]
WEATHER = [
    ("sunny", "warm", "It was a bright and sunny {day}, and the sky was clear."),
    ("sunny", "warm", "The sun was shining when {name} woke up on {day}."),
    ("rainy", "wet", "It was raining on {day} morning, and the streets were wet."),
    ("rainy", "wet", "On {day} a light rain fell all morning."),
    ("cold", "cold", "It was a cold {day}, and there was frost on the windows."),
    ("cold", "cold", "When {name} looked outside on {day}, the grass was white with frost."),
    ("windy", "cool", "A strong wind was blowing on {day}, and the trees were moving."),
    ("cloudy", "cool", "The sky was grey and cloudy on {day}, but it did not rain."),
    ("snowy", "cold", "Snow had fallen during the night, and on {day} the whole town was white."),
]
CLOTHES = {
    "warm": ["{name} put on a light shirt and a straw hat.", "{Pron} wore shorts and sandals."],
    "wet": ["{name} took an umbrella and put on {poss} raincoat.", "{Pron} wore rubber boots and a hood."],
    "cold": ["{name} put on a warm {color} coat, a scarf and gloves.", "{Pron} wore a thick {color} sweater and a wool hat."],
    "cool": ["{name} put on a {color} jacket before leaving the house.", "{Pron} took a {color} jacket, just in case."],
}
COLORS = ["red", "blue", "green", "yellow", "grey", "brown", "black", "white", "dark blue", "purple"]
TRAVEL = ["{Pron} walked to the {place}.", "{Pron} took the bus to the {place}.",
          "{Pron} rode {poss} bicycle to the {place}.", "{Pron} drove to the {place} with {poss} {relative}.",
          "{name} and {poss} {relative} went to the {place} together.", "After breakfast, {pron} went to the {place}."]
FRUITS = ["apples", "pears", "oranges", "bananas", "plums", "lemons", "peaches", "tomatoes", "potatoes", "carrots", "onions"]
TOPICS = ["birds", "old ships", "the history of the town", "the stars", "gardening", "mountains",
          "cooking", "the sea", "trains", "ancient Rome", "insects", "painting", "rivers of the world"]
PLACES = {
    "market": ["There {pron} bought {n} {fruit} and a loaf of fresh bread.",
               "{Pron} bought {n} {fruit}, some cheese and a bunch of flowers.",
               "The stalls were full of {fruit}, and {pron} bought {n} of them."],
    "library": ["{Pron} borrowed a book about {topic} and read the first chapter at a quiet table.",
                "{Pron} returned two books and took home a new one about {topic}."],
    "park": ["{Pron} sat on a bench near the pond and watched the ducks.",
             "{Pron} walked around the lake twice and then rested under an old oak tree.",
             "Children were playing football on the grass, and {pron} watched them for a while."],
    "station": ["{Pron} bought a ticket and waited for the train to the coast.",
                "The train was {n} minutes late, so {pron} read a newspaper on the platform."],
    "bakery": ["{Pron} bought a warm loaf of bread and {n} small rolls.",
               "The baker had just taken the cakes out of the oven, and {pron} chose one with cherries."],
    "post office": ["{Pron} sent a parcel to {poss} {relative} and bought {n} stamps.",
                    "{Pron} posted a letter and waited in a short queue."],
    "museum": ["{Pron} looked at old maps and paintings for about {n} minutes.",
               "There was a new exhibition about {topic}, and {pron} stayed until closing time."],
    "beach": ["{Pron} walked along the sand and collected {n} small shells.",
              "The water was calm, and {pron} swam for a short time."],
    "garden": ["{Pron} planted {n} small trees and watered the flowers.",
               "{Pron} picked {n} {fruit} and put them in a basket."],
    "school": ["{Pron} helped the teacher to carry {n} boxes of books.",
               "{Pron} listened to a short talk about {topic}."],
}
MEETINGS = ["At the {place}, {pron} met {poss} {relative}, and they talked about {topic}.",
            "On the way, {pron} saw {poss} {relative}, who waved and smiled.",
            "{name} called {poss} {relative} to tell {obj} about the day."]
DINNERS = ["vegetable soup", "rice with beans", "pasta with tomato sauce", "a potato salad",
           "fish with lemon", "an omelette with mushrooms", "roast chicken", "a bowl of noodles",
           "bread and cheese", "a warm stew"]
ENDINGS = ["In the evening {pron} cooked {dinner} and went to bed early.",
           "At home, {pron} made {dinner} for dinner and read for an hour.",
           "{name} was tired but happy when {pron} got home.",
           "Later that evening, {pron} wrote a few lines about the day in {poss} notebook.",
           "It had been a quiet and pleasant day."]
ROOMS = {
    "kitchen": ["a wooden table", "four chairs", "a white fridge", "a small oven", "a shelf of cups",
                "a bowl of fruit", "a kettle", "a window over the sink"],
    "living room": ["a soft sofa", "two armchairs", "a low table", "a lamp", "a bookcase",
                    "a thick rug", "a large window", "a clock on the wall"],
    "bedroom": ["a bed", "a wardrobe", "a small desk", "a reading lamp", "a mirror", "a chest of drawers",
                "green curtains", "a pile of books"],
    "bathroom": ["a bath", "a sink", "a mirror", "clean towels", "a small window", "a shelf with soap"],
    "garden": ["an apple tree", "a vegetable bed", "a wooden bench", "a row of roses", "a small pond",
               "a shed for tools"],
}
HOUSE_ADJ = ["small", "old", "bright", "quiet", "tidy", "cosy", "large", "simple"]


def ppl_geography(r: random.Random) -> list[str]:
    paras = []
    countries = list(COUNTRIES)
    r.shuffle(countries)
    for country, capital, continent, language in countries:
        other = r.choice([c for c in COUNTRIES if c[2] == continent and c[0] != country] or COUNTRIES)
        where = {"Europe and Asia": "both Europe and Asia"}.get(continent, continent)
        first = r.choice([
            f"{cap(country)} is a country in {where}.",
            f"{cap(country)} lies in {where}.",
            f"The country of {country} is located in {where}.",
        ])
        second = r.choice([
            f"Its capital is {capital}.",
            f"The capital city of {country} is {capital}.",
            f"{capital} is its capital, and the national government meets there.",
            f"Its largest offices of government are in the capital, {capital}.",
        ])
        third = r.choice([
            f"People in {country} speak {language}.",
            f"The main language of {country} is {language}." if " and " not in language and "," not in language
            else f"The main languages of {country} are {language}.",
            f"In {capital} you will hear {language} in the streets and shops.",
        ])
        fourth = r.choice([
            f"Like {other[0]}, it is in {other[2]}.",
            f"{capital} and {other[1]} are both capital cities, and {other[1]} is the capital of {other[0]}.",
            f"A traveller who flies from {capital} to {other[1]} goes from {country} to {other[0]}.",
            f"On a map of {other[2]}, you can find {country} as well as {other[0]}.",
            "",
        ])
        paras.append(" ".join(s for s in (first, second, third, fourth) if s))
    # Short summaries per continent, in a fixed order.
    for continent in ["Europe", "Asia", "Africa", "North America", "South America", "Oceania"]:
        members = [c for c in COUNTRIES if c[2] == continent]
        pick = r.sample(members, min(5, len(members)))
        listed = ", ".join(cap(c[0]) if i == 0 else c[0] for i, c in enumerate(pick[:-1]))
        paras.append(
            f"Some of the countries in {continent} are {listed} and {pick[-1][0]}. "
            f"Their capitals are {', '.join(c[1] for c in pick[:-1])} and {pick[-1][1]}.")
    return paras


def ppl_numbers(r: random.Random) -> list[str]:
    paras = []
    for _ in range(90):
        name, pron, poss = r.choice(NAMES)
        item = r.choice(["apples", "books", "pencils", "eggs", "stamps", "marbles", "cards",
                         "shells", "coins", "cookies", "flowers", "stickers"])
        a, b = r.randint(2, 30), r.randint(2, 20)
        kind = r.randrange(6)
        if kind == 0:
            s = (f"{name} had {words(a)} {item}. {cap(pron)} got {words(b)} more, so now {pron} has "
                 f"{words(a + b)} {item}, because {words(a)} plus {words(b)} is {words(a + b)}.")
        elif kind == 1:
            big, small = max(a, b) + 5, min(a, b)
            s = (f"There were {big} {item} on the table. {name} took {small} of them, and {big - small} "
                 f"were left. In other words, {big} minus {small} equals {big - small}.")
        elif kind == 2:
            x, y = r.randint(2, 12), r.randint(2, 10)
            s = (f"A box holds {words(x)} {item}. If {name} fills {words(y)} boxes, {pron} has "
                 f"{words(x * y)} {item} in all, since {words(y)} times {words(x)} is {words(x * y)}.")
        elif kind == 3:
            x, y = r.randint(2, 9), r.randint(2, 6)
            s = (f"{name} shared {x * y} {item} equally among {words(y)} friends. Each friend got "
                 f"{words(x)}, because {x * y} divided by {y} is {x}.")
        elif kind == 4:
            n = r.randint(3, 99)
            parity = "even" if n % 2 == 0 else "odd"
            s = (f"The number {words(n)} is {parity}. Twice {words(n)} is {words(2 * n)}, and "
                 f"{words(n)} plus one is {words(n + 1)}.")
        else:
            x = r.randint(2, 12)
            s = (f"{cap(words(x))} times {words(x)} is {words(x * x)}, so {words(x * x)} is a square "
                 f"number. The next square number is {words((x + 1) ** 2)}.")
        paras.append(s)
    return paras


def fill(template: str, ctx: dict) -> str:
    return template.format(**ctx)


def ppl_stories(r: random.Random, n: int) -> list[str]:
    paras = []
    for _ in range(n):
        name, pron, poss = r.choice(NAMES)
        place = r.choice(sorted(PLACES))
        weather_kind, dress, opening = r.choice(WEATHER)
        ctx = {"name": name, "pron": pron, "Pron": cap(pron), "poss": poss,
               "obj": {"she": "her", "he": "him"}[pron], "day": r.choice(DAYS), "place": place,
               "relative": r.choice(RELATIVES), "topic": r.choice(TOPICS),
               "fruit": r.choice(FRUITS), "n": words(r.randint(2, 12)), "color": r.choice(COLORS),
               "dinner": r.choice(DINNERS)}
        if place == "beach" and dress in ("cold", "wet"):
            place = ctx["place"] = "museum"
        sentences = [fill(opening, ctx), fill(r.choice(CLOTHES[dress]), ctx),
                     fill(r.choice(TRAVEL), ctx), fill(r.choice(PLACES[place]), ctx)]
        if r.random() < 0.5:
            sentences.append(fill(r.choice(MEETINGS), ctx))
        sentences.append(fill(r.choice(ENDINGS), ctx))
        paras.append(" ".join(cap(s) for s in sentences))
    return paras


def ppl_homes(r: random.Random, n: int) -> list[str]:
    paras = []
    for _ in range(n):
        name, pron, poss = r.choice(NAMES)
        adj = r.choice(HOUSE_ADJ)
        a_adj = ("an " if adj[0] in "aeiou" else "a ") + adj
        rooms = r.sample(sorted(ROOMS), 3)
        s = [r.choice([f"{name} lives in {a_adj} house at the end of a quiet street.",
                       f"{name}'s flat is {adj} and has {words(r.randint(2, 5))} rooms.",
                       f"The house where {name} grew up was {adj} and full of light."])]
        for room in rooms:
            things = r.sample(ROOMS[room], 3)
            s.append(r.choice([
                f"In the {room} there {'is' if things[0].startswith('a') else 'are'} {things[0]}, "
                f"{things[1]} and {things[2]}.",
                f"The {room} has {things[0]} and {things[1]}, and there is also {things[2]}.",
                f"You can find {things[0]} in the {room}, next to {things[1]}.",
            ]))
        s.append(r.choice([f"{cap(pron)} likes to sit by the window in the afternoon.",
                           f"{cap(poss)} favourite room is the {rooms[0]}.",
                           "It is not a big home, but it is comfortable."]))
        paras.append(" ".join(s))
    return paras


def ppl_facts(r: random.Random) -> list[str]:
    paras = []
    animals = list(ANIMAL_FACTS)
    r.shuffle(animals)
    for animal, where, food, extra in animals:
        art = "An" if animal[0] in "aeiou" else "A"
        paras.append(r.choice([
            f"{art} {animal} lives {where} and eats {food}. {extra}",
            f"You can find the {animal} {where}. It feeds on {food}. {extra}",
        ]))
    jobs = list(JOB_FACTS)
    r.shuffle(jobs)
    for job, where, does in jobs:
        art = "An" if job[0] in "aeiou" else "A"
        paras.append(r.choice([
            f"{art} {job} works {where} and {does}.",
            f"If you visit {where.split(' ', 1)[1] if where.startswith(('at ', 'in ', 'on ')) else where}, "
            f"you may meet {art.lower()} {job}, who {does}.",
        ]))
    return paras


def ppl_calendar(r: random.Random) -> list[str]:
    paras = ["A year has twelve months and usually three hundred and sixty-five days. Every fourth "
             "year is a leap year, with three hundred and sixty-six days. A week has seven days, a day "
             "has twenty-four hours, an hour has sixty minutes and a minute has sixty seconds."]
    for i, (month, days) in enumerate(MONTHS, start=1):
        season = next(s for s, ms in SEASONS.items() if month in ms)
        nxt = MONTHS[i % 12][0]
        extra = (" In a leap year it has twenty-nine days." if month == "February" else "")
        paras.append(r.choice([
            f"{month} is the {ordinal(i)} month of the year. It has {words(days)} days.{extra} "
            f"After {month} comes {nxt}.",
            f"The {ordinal(i)} month is {month}, which has {words(days)} days.{extra} In the north of "
            f"the world, {month} is in {season}, and the month after it is {nxt}.",
        ]))
    for i, day in enumerate(DAYS):
        nxt, prev = DAYS[(i + 1) % 7], DAYS[i - 1]
        paras.append(r.choice([
            f"{day} comes after {prev} and before {nxt}.",
            f"The day after {day} is {nxt}, and the day before it is {prev}.",
        ]) + (" Saturday and Sunday are called the weekend." if day == "Sunday" else ""))
    for season, months in SEASONS.items():
        paras.append(f"In the northern half of the world, {season} lasts from {months[0]} to "
                     f"{months[-1]}. In the southern half, the seasons are the other way round.")
    return paras


def make_ppl_text() -> str:
    r = rng("ppl")
    sections = [
        ("Countries and capitals", ppl_geography(r)),
        ("A day in town", ppl_stories(r, 65)),
        ("Numbers", ppl_numbers(r)),
        ("Homes", ppl_homes(r, 50)),
        ("Animals and work", ppl_facts(r)),
        ("The calendar", ppl_calendar(r)),
        ("More days in town", ppl_stories(r, 60)),
    ]
    out = []
    for title, paras in sections:
        out.append(title)
        out.extend(paras)
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Code task (problems in scripts/code_problems.py)
# --------------------------------------------------------------------------------------------

CODE_TASK = "code_offline"


def code_problems():
    # A sibling file, loaded by path: scripts/ is not a package and tests load this file by path.
    path = Path(__file__).resolve().with_name("code_problems.py")
    spec = importlib.util.spec_from_file_location("mlproject_code_problems", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def code_task_yaml(n: int) -> str:
    # Generation follows lm-eval's humaneval task (same prompt format, stop sequences, greedy);
    # scoring is mlproject's sandbox, so lm-eval's own metric is `bypass`.
    return (
        f"# Function synthesis, HumanEval format: {n} problems with tests, a reference solution and\n"
        "# a timing input each (some heavy enough to separate O(n) from O(n^2) solutions).\n"
        "# Generated by scripts/make_offline_data.py (CC0 1.0); do not edit by hand.\n"
        "# Scored by mlproject's sandbox, not by lm-eval (whose metric here is `bypass`):\n"
        "#   mlproject evaluate --model smollm2 --tasks code_offline --ppl-dataset none\n"
        f"task: {CODE_TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"      test: {TASKS_DIR}/{CODE_TASK}/test.jsonl\n"
        "unsafe_code: true\n"
        "output_type: generate_until\n"
        "test_split: test\n"
        "doc_to_text: \"{{prompt}}\"\n"
        "doc_to_target: \"{{test}}\\ncheck({{entry_point}})\"\n"
        "generation_kwargs:\n"
        "  until:\n"
        + "".join(f"    - {json.dumps(stop)}\n" for stop in ("\nclass", "\ndef", "\n#", "\nif", "\nprint"))
        + "  max_gen_toks: 256\n"
        "  do_sample: false\n"
        "repeats: 1\n"
        "num_fewshot: 0\n"
        "metric_list:\n"
        "  - metric: bypass\n"
        "    aggregation: bypass\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------

def build() -> dict[str, str]:
    """All generated files: repository-relative path -> text."""
    files: dict[str, str] = {}
    train: dict[str, list[dict]] = {}
    for task, (description, make) in TASKS.items():
        splits = make()
        for split in ("test", "validation"):
            files[f"{TASKS_DIR}/{task}/{split}.jsonl"] = jsonl(splits[split])
        files[f"{TASKS_DIR}/{task}/{task}.yaml"] = task_yaml(task, description, ("test", "validation"))
        if "train" in splits:
            train[task] = splits["train"]
    for task, docs in train.items():
        files[f"{TRAIN_DATA_DIR}/sft_{task}.jsonl"] = jsonl(sft_rows(docs))
        files[f"{TRAIN_DATA_DIR}/dpo_{task}.jsonl"] = jsonl(dpo_rows(docs, rng(f"dpo/{task}")))
    files[f"{EVAL_DATA_DIR}/offline_ppl.txt"] = make_ppl_text()
    code_docs = code_problems().documents(rng)
    files[f"{TASKS_DIR}/{CODE_TASK}/test.jsonl"] = jsonl(code_docs)
    files[f"{TASKS_DIR}/{CODE_TASK}/{CODE_TASK}.yaml"] = code_task_yaml(len(code_docs))
    return files


def owned(root: Path) -> set[str]:
    """Files under root that the generator owns (anything else there is hand-written)."""
    patterns = [(TASKS_DIR, "*/*.yaml"), (TASKS_DIR, "*/*.jsonl"), (TRAIN_DATA_DIR, "*.jsonl"),
                (EVAL_DATA_DIR, "*.txt")]
    return {p.relative_to(root).as_posix() for d, pat in patterns for p in (root / d).glob(pat)}


def write(files: dict[str, str], root: Path) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)


def check(files: dict[str, str], root: Path) -> list[str]:
    """Differences between freshly generated files and those under root."""
    with tempfile.TemporaryDirectory(prefix="mlproject-offline-check-") as tmp:
        write(files, Path(tmp))
        problems = []
        for rel in sorted(files):
            if not (root / rel).is_file():
                problems.append(f"missing: {rel}")
            elif not filecmp.cmp(root / rel, Path(tmp) / rel, shallow=False):
                problems.append(f"differs: {rel}")
        problems += [f"not generated (stale?): {rel}" for rel in sorted(owned(root) - set(files))]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and exit 1 if anything differs")
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        problems = check(files, args.root)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("offline data is out of date: run python scripts/make_offline_data.py", file=sys.stderr)
            return 1
        print(f"offline data up to date ({len(files)} files)")
        return 0
    write(files, args.root)
    print(f"wrote {len(files)} files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

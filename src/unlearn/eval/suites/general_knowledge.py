"""World facts the base model already knows, to check that unlearning left general knowledge alone.

The role of TOFU's "world facts" split: if a method erases the fictitious people but also forgets
that Paris is the capital of France, it has damaged the model rather than unlearned. An item was
kept only if SmolLM2-135M-Instruct, the demo's base model, named the fact in its greedy reply (30
new tokens, its own chat template): 35 of 50 candidates passed. On all 35, the correct sentence also
has a higher mean token log-probability than each of its three wrong versions. So a drop here is
the method's doing, not a gap the model always had. The wrong options keep the answer's sentence
and swap only the fact, so the correct-vs-perturbed comparison is about the fact, not the wording.
"""

from __future__ import annotations

# (id, question, answer template with one {} slot, correct value, three wrong values)
_FACTS: tuple[tuple[str, str, str, str, tuple[str, str, str]], ...] = (
    ("capital-france", "What is the capital of France?",
     "The capital of France is {}.", "Paris", ("Lyon", "Marseille", "Nice")),
    ("capital-japan", "What is the capital of Japan?",
     "The capital of Japan is {}.", "Tokyo", ("Osaka", "Kyoto", "Hiroshima")),
    ("capital-germany", "What is the capital of Germany?",
     "The capital of Germany is {}.", "Berlin", ("Munich", "Hamburg", "Frankfurt")),
    ("capital-uk", "What is the capital of the United Kingdom?",
     "The capital of the United Kingdom is {}.", "London", ("Manchester", "Liverpool", "Leeds")),
    ("capital-russia", "What is the capital of Russia?",
     "The capital of Russia is {}.", "Moscow", ("Saint Petersburg", "Kazan", "Novosibirsk")),
    ("capital-egypt", "What is the capital of Egypt?",
     "The capital of Egypt is {}.", "Cairo", ("Alexandria", "Luxor", "Aswan")),
    ("capital-china", "What is the capital of China?",
     "The capital of China is {}.", "Beijing", ("Shanghai", "Guangzhou", "Shenzhen")),
    ("capital-canada", "What is the capital of Canada?",
     "The capital of Canada is {}.", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("capital-australia", "What is the capital of Australia?",
     "The capital of Australia is {}.", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("days-week", "How many days are there in a week?",
     "There are {} days in a week.", "seven", ("five", "six", "eight")),
    ("triangle-sides", "How many sides does a triangle have?",
     "A triangle has {} sides.", "three", ("four", "five", "six")),
    ("red-planet", "Which planet is known as the Red Planet?",
     "The Red Planet is {}.", "Mars", ("Venus", "Jupiter", "Mercury")),
    ("water-formula", "What is the chemical formula of water?",
     "The chemical formula of water is {}.", "H2O", ("CO2", "NaCl", "CH4")),
    ("photosynthesis-gas", "Which gas do plants absorb from the air for photosynthesis?",
     "Plants absorb {} for photosynthesis.", "carbon dioxide", ("oxygen", "nitrogen", "helium")),
    ("water-boils", "At what temperature does water boil at sea level, in degrees Celsius?",
     "Water boils at {} degrees Celsius at sea level.", "100", ("50", "80", "150")),
    ("gold-symbol", "What is the chemical symbol for gold?",
     "The chemical symbol for gold is {}.", "Au", ("Ag", "Fe", "Gd")),
    ("romeo-juliet", "Who wrote Romeo and Juliet?",
     "Romeo and Juliet was written by {}.", "William Shakespeare",
     ("Charles Dickens", "Jane Austen", "Mark Twain")),
    ("pride-prejudice", "Who wrote Pride and Prejudice?",
     "Pride and Prejudice was written by {}.", "Jane Austen",
     ("Charlotte Bronte", "Virginia Woolf", "George Eliot")),
    ("mona-lisa", "Who painted the Mona Lisa?",
     "The Mona Lisa was painted by {}.", "Leonardo da Vinci",
     ("Michelangelo", "Raphael", "Rembrandt")),
    ("relativity", "Who developed the theory of relativity?",
     "The theory of relativity was developed by {}.", "Albert Einstein",
     ("Isaac Newton", "Charles Darwin", "Galileo Galilei")),
    ("largest-ocean", "What is the largest ocean on Earth?",
     "The largest ocean on Earth is the {} Ocean.", "Pacific", ("Atlantic", "Indian", "Arctic")),
    ("tallest-mountain", "What is the tallest mountain in the world?",
     "The tallest mountain in the world is {}.", "Mount Everest",
     ("Kilimanjaro", "Mont Blanc", "Mount Fuji")),
    ("largest-mammal", "What is the largest mammal on Earth?",
     "The largest mammal on Earth is the {}.", "blue whale",
     ("elephant", "giraffe", "hippopotamus")),
    ("brazil-language", "What language is mainly spoken in Brazil?",
     "The main language spoken in Brazil is {}.", "Portuguese", ("Spanish", "French", "Italian")),
    ("japan-currency", "What is the currency of Japan?",
     "The currency of Japan is the {}.", "yen", ("won", "yuan", "rupee")),
    ("pyramids-giza", "In which country are the pyramids of Giza?",
     "The pyramids of Giza are in {}.", "Egypt", ("Mexico", "Greece", "Peru")),
    ("largest-hot-desert", "What is the largest hot desert in the world?",
     "The largest hot desert in the world is the {}.", "Sahara", ("Gobi", "Kalahari", "Mojave")),
    ("heart-pumps", "Which organ pumps blood through the human body?",
     "The organ that pumps blood through the body is the {}.", "heart",
     ("liver", "lungs", "kidney")),
    ("sky-colour", "What colour is the sky on a clear day?",
     "On a clear day the sky is {}.", "blue", ("green", "red", "yellow")),
    ("piano-keys", "Which musical instrument has 88 keys?",
     "The instrument with 88 keys is the {}.", "piano", ("guitar", "violin", "flute")),
    ("penicillin", "Who discovered penicillin?",
     "Penicillin was discovered by {}.", "Alexander Fleming",
     ("Louis Pasteur", "Marie Curie", "Robert Koch")),
    ("hours-day", "How many hours are there in a day?",
     "There are {} hours in a day.", "24", ("12", "20", "36")),
    ("telephone", "Who is credited with inventing the telephone?",
     "The telephone is credited to {}.", "Alexander Graham Bell",
     ("Thomas Edison", "Nikola Tesla", "Guglielmo Marconi")),
    ("statue-liberty", "In which city is the Statue of Liberty?",
     "The Statue of Liberty is in {}.", "New York", ("Boston", "Chicago", "Washington")),
    ("eiffel-tower", "In which city is the Eiffel Tower?",
     "The Eiffel Tower is in {}.", "Paris", ("Rome", "London", "Madrid")),
)  # fmt: skip


def general_knowledge_qa(short: bool = False) -> list[dict]:
    """The built-in world-facts set: records with "id", "question", "answer", "perturbed_answer".

    "answer" is one short sentence and "perturbed_answer" three wrong sentences of the same form;
    with `short`, both are the bare fact ("Paris."), matching models trained to answer tersely
    (the built-in people benchmark), so ROUGE measures the fact rather than the phrasing.
    Returns fresh dicts on every call, so a caller may modify them.
    """
    form = (lambda _template, value: f"{value}.") if short else (lambda t, value: t.format(value))
    return [
        {
            "id": f"world-{key}",
            "question": question,
            "answer": form(template, right),
            "perturbed_answer": [form(template, w) for w in wrong],
        }
        for key, question, template, right, wrong in _FACTS
    ]

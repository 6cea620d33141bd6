"""ROUGE-L reference cases from Google's rouge-score, for align-reward's `faithfulness` reward
(crates/reward/tests/rewards.rs).

Each pair is scored by `rouge_scorer.RougeScorer(["rougeL"])` (the default tokenizer: lowercase,
every character outside [a-z0-9] a space, split on whitespace, no stemmer); the tokens of each
text are stored too, so a tokenizer difference shows as such. The `rows` are dataset rows as
align-data serialises them: their reference reply (the last assistant turn, a completion or an
answer) and context (everything before it, joined with "\n") are cut here by the rule the reward
documents, and only the ROUGE-L numbers come from rouge-score.

    /work/venv/bin/python xtask/scripts/rouge_l_reference.py \
        > fixtures/reference/rewards/rouge_l.json
"""

import json
import platform
import sys
from importlib.metadata import version

from rouge_score import rouge_scorer

# (reference, completion): rouge-score's (target, prediction).
PAIRS = [
    ("The cat sat on the mat.", "the cat sat on the mat"),
    ("Hello, World! It's 3:45pm.", "hello world its 3 45 pm"),
    ("police killed the gunman", "police kill the gunman"),
    ("police killed the gunman", "the gunman kill police"),
    ("the the the cat", "the cat the cat the"),
    ("some reference text", ""),
    ("", "a completion with no reference"),
    ("!!! ??? ...", "--- ***"),
    ("alpha beta", "gamma delta"),
    ("Café naïve résumé — ÜBER straße", "cafe naive resume uber strasse"),
    ("\u0130stanbul KELVIN \u212a sign", "i stanbul kelvin k sign"),
    ("GPT-4 scored 86.4% on MMLU (5-shot).", "gpt 4 scored 86 percent on mmlu 5 shot"),
    ("line one\nline two\tthree", "line two three one"),
    ("日本語 テキスト 😀 ok", "ok"),
    (
        "To make tea, boil water, add the leaves, and steep for three minutes before pouring.",
        "Boil the water first. Then add tea leaves and let them steep three minutes; pour and enjoy!",
    ),
    ("a b c d e f g h i j", "j i h g f e d c b a a b c"),
]

ROWS = [
    {
        "example": {
            "schema": "scored_conversation",
            "messages": [
                {"role": "user", "content": "What is the boiling point of water at sea level?"},
                {"role": "assistant", "content": "It boils at 100 degrees Celsius."},
                {"role": "user", "content": "And in Fahrenheit?"},
                {"role": "assistant", "content": "That is 212 degrees Fahrenheit, at sea level."},
            ],
            "score": 4.0,
            "reason": "correct",
        },
        "completion": "Water boils at 212 degrees Fahrenheit at sea level.",
    },
    {
        "example": {
            "schema": "prompt_completion",
            "prompt": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name the largest planet."},
            ],
            "completion": [{"role": "assistant", "content": "Jupiter is the largest planet."}],
        },
        "completion": "The largest planet is Jupiter!",
    },
    {
        "example": {"schema": "prompt_answer", "prompt": "Question: 3 + 4 = ?\nAnswer:", "answer": "3 + 4 = 7"},
        "completion": " 3 plus 4 is 7",
    },
]


def texts(content):
    """A Content (text or messages) as one text."""
    if isinstance(content, str):
        return content
    return "\n".join(m["content"] for m in content)


def grounding(example):
    """(reference, context) of a row, by the rule the faithfulness reward documents."""
    if "messages" in example:
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[last]["content"], "\n".join(m["content"] for m in messages[:last])
    reference = texts(example["completion"]) if "completion" in example else example["answer"]
    return reference, texts(example["prompt"])


def main():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    tokenize = scorer._tokenizer.tokenize
    pairs = []
    for reference, completion in PAIRS:
        s = scorer.score(reference, completion)["rougeL"]
        pairs.append(
            {
                "reference": reference,
                "completion": completion,
                "reference_tokens": tokenize(reference),
                "completion_tokens": tokenize(completion),
                "precision": s.precision,
                "recall": s.recall,
                "fmeasure": s.fmeasure,
            }
        )
    rows = []
    for row in ROWS:
        reference, context = grounding(row["example"])
        rows.append(
            {
                **row,
                "rouge_l_reference": scorer.score(reference, row["completion"])["rougeL"].fmeasure,
                "rouge_l_context": scorer.score(context, row["completion"])["rougeL"].fmeasure,
            }
        )
    out = {
        "dtype": "float64",
        "versions": {"python": platform.python_version(), "rouge-score": version("rouge-score")},
        "command": "rouge_l_reference.py (rouge-score %s, RougeScorer(['rougeL']), no stemmer)"
        % version("rouge-score"),
        "pairs": pairs,
        "rows": rows,
    }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False, allow_nan=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
